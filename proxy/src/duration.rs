//! Durations as Go writes them, which is how Istio's settings and annotations hold them.

/// A Go duration as Istio's environment writes it: `24h`, `1h30m`, `90s`, `500ms`.
pub fn parse_go_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {s:?}: expected e.g. 24h, 1h30m, 90s");
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(bad()),
        };
        total += value * seconds;
        rest = &rest[unit..];
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_as_istio_writes_them() {
        assert_eq!(
            parse_go_duration("24h"),
            Ok(std::time::Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_go_duration("24h0m0s"),
            Ok(std::time::Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_go_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5_400))
        );
        assert_eq!(
            parse_go_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        for bad in ["", "24", "h", "1d", "-1h"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }
}
