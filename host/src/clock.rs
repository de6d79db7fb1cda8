//! Wall-clock time as RFC 3339 text, the form MODE events and logs use.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The current time in UTC as RFC 3339 with millisecond precision, e.g.
/// `2026-11-26T10:29:21.123Z`.
pub fn now_rfc3339() -> String {
    format_rfc3339(OffsetDateTime::now_utc())
}

/// Formats a time in UTC as RFC 3339 with millisecond precision.
pub fn format_rfc3339(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let at = at
        .replace_nanosecond(at.millisecond() as u32 * 1_000_000)
        .unwrap_or(at);
    at.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_in_utc_with_milliseconds() {
        let at = time::macros::datetime!(2026-11-26 10:29:21.123456 +02:00);
        assert_eq!(format_rfc3339(at), "2026-11-26T08:29:21.123Z");
    }
}
