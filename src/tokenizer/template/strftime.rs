//! `strftime_now(fmt)` for chat templates: C/Python `strftime` over the UTC calendar, computed
//! without a time library. Always UTC; the clock is read in `strftime_now` only.

use std::fmt::Write as _;

pub(super) fn strftime_now(format: &str) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime_utc(format, now)
}

const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// The calendar fields of a UTC instant.
struct Civil {
    year: i64,
    /// 1..=12
    month: usize,
    /// 1..=31
    day: i64,
    /// 0 = Sunday
    weekday: usize,
    /// 1..=366
    yday: i64,
    hour: i64,
    minute: i64,
    second: i64,
}

impl Civil {
    fn from_unix(secs: i64) -> Civil {
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400);
        // Days since 1970-01-01 to a proleptic Gregorian date (era-based, exact for all i64 days
        // that matter here).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUMULATIVE[(month - 1) as usize] + day + i64::from(leap && month > 2);
        Civil {
            year,
            month: month as usize,
            day,
            weekday: (days + 4).rem_euclid(7) as usize, // 1970-01-01 was a Thursday
            yday,
            hour: tod / 3600,
            minute: tod / 60 % 60,
            second: tod % 60,
        }
    }
}

/// C/Python `strftime` for the common directives, in UTC. `%-d` (glibc's no-padding flag) is
/// honoured; an unknown directive is copied through, as glibc does.
fn strftime_utc(format: &str, unix_secs: i64) -> String {
    let t = Civil::from_unix(unix_secs);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let pad = spec != Some('-');
        if !pad {
            spec = chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            let _ = if pad { write!(out, "{v:0width$}") } else { write!(out, "{v}") };
        };
        let hour12 = if t.hour % 12 == 0 { 12 } else { t.hour % 12 };
        match spec {
            Some('Y') => {
                let _ = write!(out, "{}", t.year);
            }
            Some('y') => num(&mut out, t.year.rem_euclid(100), 2),
            Some('m') => num(&mut out, t.month as i64, 2),
            Some('d') => num(&mut out, t.day, 2),
            Some('e') => {
                let _ = if pad { write!(out, "{:2}", t.day) } else { write!(out, "{}", t.day) };
            }
            Some('j') => num(&mut out, t.yday, 3),
            Some('H') => num(&mut out, t.hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, t.minute, 2),
            Some('S') => num(&mut out, t.second, 2),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('A') => out.push_str(WEEKDAYS[t.weekday]),
            Some('a') => out.push_str(&WEEKDAYS[t.weekday][..3]),
            Some('B') => out.push_str(MONTHS[t.month - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[t.month - 1][..3]),
            Some('F') => {
                let _ = write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day);
            }
            Some('T') => {
                let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
            }
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python_gmtime() {
        // Python: time.strftime(fmt, time.gmtime(1721999096)) -> 2024-07-26 13:04:56 UTC, a Friday.
        let ts = 1_721_999_096;
        assert_eq!(strftime_utc("%d %b %Y", ts), "26 Jul 2024");
        assert_eq!(strftime_utc("%A, %B %-d, %Y %I:%M:%S %p", ts), "Friday, July 26, 2024 01:04:56 PM");
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M %j %a %y %%", ts), "2024-07-26 13:04 208 Fri 24 %");
        // Leap day and the epoch.
        assert_eq!(strftime_utc("%F %T %j", 951_782_400), "2000-02-29 00:00:00 060");
        assert_eq!(strftime_utc("%F %A", 0), "1970-01-01 Thursday");
        assert_eq!(strftime_utc("%Q %", 0), "%Q %");
    }
}
