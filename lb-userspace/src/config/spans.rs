//! File positions: the line and column of a byte offset, and the field of
//! a TOML document at a path or offset.

use std::{collections::HashMap, ops::Range};

use super::errors::Seg;

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// The span of the value at `path` in a TOML document.
pub(super) fn span_of(text: &str, path: &[Seg]) -> Option<Range<usize>> {
    let doc = toml::de::DeTable::parse_recoverable(text).0;
    let mut span = doc.span();
    let mut value = toml::de::DeValue::Table(doc.into_inner());
    for seg in path {
        let next = match (&value, seg) {
            (toml::de::DeValue::Table(t), Seg::Key(k)) => t
                .iter()
                .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                .map(|(key, v)| (key.span(), v.clone())),
            (toml::de::DeValue::Array(a), Seg::Index(i)) => {
                a.get(*i).map(|v| (v.span(), v.clone()))
            }
            _ => None,
        };
        let Some((key_span, v)) = next else { break };
        // Point at the key for tables, at the value otherwise.
        span = if matches!(v.get_ref(), toml::de::DeValue::Table(_)) {
            key_span
        } else {
            v.span()
        };
        value = v.into_inner();
    }
    Some(span)
}

/// For text too broken to parse: the `key =` on the line of `offset`, under
/// the nearest `[table]` or `[[array]]` header above it.
pub(super) fn field_by_line(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    });
    let mut table = String::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let n = arrays.entry(name.trim().to_string()).or_insert(0);
            table = format!("{}[{}]", name.trim(), *n);
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = name.trim().to_string();
        }
    }
    match (table.is_empty(), key) {
        (_, None) => table,
        (true, Some(k)) => k.to_string(),
        (false, Some(k)) => format!("{table}.{k}"),
    }
}

/// The deepest field whose value holds `offset`.
pub(super) fn path_at(text: &str, offset: usize) -> Vec<Seg> {
    let doc = toml::de::DeTable::parse_recoverable(text).0;
    let mut path = Vec::new();
    let mut value = toml::de::DeValue::Table(doc.into_inner());
    loop {
        let next = match &value {
            toml::de::DeValue::Table(t) => t.iter().find_map(|(k, v)| {
                let s = v.span();
                let ks = k.span();
                ((s.start <= offset && offset < s.end) || (ks.start <= offset && offset < ks.end))
                    .then(|| (Seg::Key(k.get_ref().to_string()), v.clone()))
            }),
            toml::de::DeValue::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
                let s = v.span();
                (s.start <= offset && offset < s.end).then(|| (Seg::Index(i), v.clone()))
            }),
            _ => None,
        };
        match next {
            Some((seg, v)) => {
                path.push(seg);
                value = v.into_inner();
            }
            None => return path,
        }
    }
}
