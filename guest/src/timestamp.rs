//! Strict RFC 3339 `date-time` check for the events' `timestamp` field.

/// Whether `s` is an RFC 3339 `date-time`:
/// `YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm)`, with `T`/`t` and `Z`/`z`
/// both accepted, and every field in range: month 1–12, the day valid for the
/// month (29 February only in leap years), hour < 24, minute < 60, second
/// ≤ 60 (leap second), offset hour < 24 and offset minute < 60.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    // Shortest form: "YYYY-MM-DDThh:mm:ssZ" (20 bytes).
    if b.len() < 20 {
        return false;
    }
    let (Some(year), Some(month), Some(day)) = (digits(b, 0, 4), digits(b, 5, 2), digits(b, 8, 2))
    else {
        return false;
    };
    let (Some(hour), Some(minute), Some(second)) =
        (digits(b, 11, 2), digits(b, 14, 2), digits(b, 17, 2))
    else {
        return false;
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return false;
    }
    if b[13] != b':' || b[16] != b':' {
        return false;
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return false;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    let mut rest = &b[19..];
    if let [b'.', tail @ ..] = rest {
        let n = tail.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &tail[n..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', ..] if rest.len() == 6 => {
            matches!((digits(rest, 1, 2), rest[3], digits(rest, 4, 2)),
                (Some(h), b':', Some(m)) if h < 24 && m < 60)
        }
        _ => false,
    }
}

/// The decimal number in `b[at..at + n]`, if those bytes are all ASCII digits.
fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let field = b.get(at..at + n)?;
    field.iter().try_fold(0u32, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

/// Number of days in `month` (1–12) of `year`, Gregorian calendar.
fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Gregorian leap year rule.
fn is_leap_year(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

#[cfg(test)]
mod tests {
    use super::is_rfc3339;

    #[test]
    fn accepts_valid_forms() {
        for ok in [
            "2026-01-02T03:04:05Z",
            "2026-01-02t03:04:05z",
            "2026-01-02T03:04:05.1Z",
            "2026-01-02T03:04:05.123456789Z",
            "2026-01-02T03:04:05+09:00",
            "2026-01-02T03:04:05-00:00",
            "2026-01-02T03:04:05.5-23:59",
            "2026-12-31T23:59:60Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
    }

    #[test]
    fn leap_years() {
        assert!(is_rfc3339("2024-02-29T00:00:00Z"));
        assert!(is_rfc3339("2000-02-29T00:00:00Z"));
        assert!(!is_rfc3339("2026-02-29T00:00:00Z"));
        assert!(!is_rfc3339("1900-02-29T00:00:00Z"));
        assert!(!is_rfc3339("2024-02-30T00:00:00Z"));
        assert!(is_rfc3339("2026-02-28T00:00:00Z"));
    }

    #[test]
    fn day_ranges_per_month() {
        assert!(is_rfc3339("2026-04-30T00:00:00Z"));
        assert!(!is_rfc3339("2026-04-31T00:00:00Z"));
        assert!(is_rfc3339("2026-05-31T00:00:00Z"));
        assert!(!is_rfc3339("2026-05-32T00:00:00Z"));
        assert!(!is_rfc3339("2026-05-00T00:00:00Z"));
    }

    #[test]
    fn refuses_invalid_forms() {
        for bad in [
            "",
            "2026-01-02",
            "2026-01-02 03:04:05Z",
            "2026-01-02T03:04Z",
            "2026-01-02T03:04:05",
            "2026-01-02T03:04:05.Z",
            "2026-1-02T03:04:05Z",
            "2026-00-02T03:04:05Z",
            "2026-13-02T03:04:05Z",
            "2026-01-02T24:00:00Z",
            "2026-01-02T23:60:00Z",
            "2026-01-02T23:59:61Z",
            "2026-01-02T03:04:05+24:00",
            "2026-01-02T03:04:05+09:60",
            "2026-01-02T03:04:05+0900",
            "2026-01-02T03:04:05+09",
            "2026-01-02T03:04:05Z ",
            " 2026-01-02T03:04:05Z",
            "2026-01-02T03:04:05ZZ",
            "+2026-01-02T03:04:05Z",
            "2026/01/02T03:04:05Z",
            "２026-01-02T03:04:05Z",
            "2026-01-02T03:04:05.١Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}
