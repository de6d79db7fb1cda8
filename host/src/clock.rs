//! Wall-clock time as RFC 3339 text, the form MODE events and logs use.

use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;

/// RFC 3339 in UTC with exactly three fractional digits.
const RFC3339_MILLIS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// The current time in UTC as RFC 3339 with millisecond precision, e.g.
/// `2026-11-26T10:29:21.120Z`.
pub fn now_rfc3339() -> String {
    format_rfc3339(OffsetDateTime::now_utc())
}

/// Formats a time in UTC as RFC 3339 with millisecond precision.
pub fn format_rfc3339(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(RFC3339_MILLIS)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_in_utc_with_three_fractional_digits() {
        let at = time::macros::datetime!(2026-11-26 10:29:21.123456 +02:00);
        assert_eq!(format_rfc3339(at), "2026-11-26T08:29:21.123Z");
        let at = time::macros::datetime!(2026-11-26 10:29:21.09 UTC);
        assert_eq!(format_rfc3339(at), "2026-11-26T10:29:21.090Z");
        let at = time::macros::datetime!(2026-11-26 10:29:21 UTC);
        assert_eq!(format_rfc3339(at), "2026-11-26T10:29:21.000Z");
    }
}
