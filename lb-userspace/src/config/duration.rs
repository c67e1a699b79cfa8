//! Durations as configs write them ("2s", "500ms", "1.5s") and back, and
//! `WireDuration`, the serde type of every duration field.

use std::time::Duration;

/// "2s", "500ms", "1.5s", "1m", "100us".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} has no unit; write e.g. \"2s\" or \"500ms\""))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. \"2s\" or \"500ms\""))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}; use us, ms, s, m or h"
            ));
        }
    };
    // Whole microseconds, so `format_duration` writes back exactly this.
    let micros = (secs * 1e6).round();
    if !micros.is_finite() || micros < 1.0 {
        return Err(format!("{s:?} must be at least 1us"));
    }
    if micros > MAX_DURATION.as_micros() as f64 {
        return Err(format!("{s:?} is too long; at most 24h"));
    }
    Ok(Duration::from_micros(micros as u64))
}

/// Longest duration a config takes (health intervals and timeouts).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The shortest exact form: whole seconds, milliseconds or microseconds.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

/// A duration on the wire: written and read as [`parse_duration`] and
/// [`format_duration`] say (humantime reads no "1.5s", which configs use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[schema(value_type = String, example = "2s")]
pub struct WireDuration(pub Duration);

impl serde::Serialize for WireDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for WireDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(WireDuration)
            .map_err(serde::de::Error::custom)
    }
}
