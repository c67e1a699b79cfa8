//! File positions from toml's spans: where a serde error is (its span, and
//! its field path from `serde_path_to_error`), and where the value of a
//! field a validation rule names is.

use std::{cell::OnceCell, collections::HashMap, ops::Range};

use toml::de::{DeTable, DeValue};

use super::errors::{Seg, path_string};

/// A config text and toml's spanned tree of it (recovered from syntax
/// errors as far as toml can), parsed only when an error needs it.
pub(super) struct Spans<'a> {
    text: &'a str,
    tree: OnceCell<toml::Spanned<DeTable<'a>>>,
}

impl<'a> Spans<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self {
            text,
            tree: OnceCell::new(),
        }
    }

    fn root(&self) -> &toml::Spanned<DeTable<'a>> {
        self.tree
            .get_or_init(|| DeTable::parse_recoverable(self.text).0)
    }

    /// 1-based line and column of a byte offset.
    pub(super) fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, col)
    }

    /// Where the field at `path` is: its key for tables (a `[[services]]`
    /// header), its value otherwise; the deepest part of `path` present.
    pub(super) fn of(&self, path: &[Seg]) -> Range<usize> {
        let mut span = self.root().span();
        let mut value = DeValue::Table(self.root().get_ref().clone());
        for seg in path {
            let next = match (&value, seg) {
                (DeValue::Table(t), Seg::Key(k)) => t
                    .iter()
                    .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                    .map(|(key, v)| (key.span(), v)),
                (DeValue::Array(a), Seg::Index(i)) => a.get(*i).map(|v| (v.span(), v)),
                _ => None,
            };
            let Some((key_span, v)) = next else { break };
            span = if matches!(v.get_ref(), DeValue::Table(_)) {
                key_span
            } else {
                v.span()
            };
            let v = v.get_ref().clone();
            value = v;
        }
        span
    }

    /// The deepest field whose key or value holds `offset`.
    pub(super) fn path_at(&self, offset: usize) -> Vec<Seg> {
        let holds = |s: Range<usize>| s.start <= offset && offset < s.end;
        let mut path = Vec::new();
        let mut value = DeValue::Table(self.root().get_ref().clone());
        loop {
            let next = match &value {
                DeValue::Table(t) => t.iter().find_map(|(k, v)| {
                    (holds(v.span()) || holds(k.span()))
                        .then(|| (Seg::Key(k.get_ref().to_string()), v.get_ref().clone()))
                }),
                DeValue::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
                    holds(v.span()).then(|| (Seg::Index(i), v.get_ref().clone()))
                }),
                _ => None,
            };
            let Some((seg, v)) = next else { return path };
            path.push(seg);
            value = v;
        }
    }

    /// The field of a serde error: the path serde was at, or the field at
    /// its span when that is deeper (an unknown key is at the table's path,
    /// its span on the key; a syntax error has no serde path).
    pub(super) fn field_of(&self, serde_path: Vec<Seg>, span: Option<Range<usize>>) -> String {
        let Some(span) = span else {
            return path_string(&serde_path);
        };
        let at = self.path_at(span.start);
        if at.is_empty() && serde_path.is_empty() {
            // A syntax error toml could not recover a tree around.
            field_by_line(self.text, span.start)
        } else if at.len() > serde_path.len() && at.starts_with(&serde_path) {
            path_string(&at)
        } else {
            path_string(&serde_path)
        }
    }
}

/// A `serde_path_to_error` path as config segments.
pub(super) fn serde_path(p: &serde_path_to_error::Path) -> Vec<Seg> {
    p.iter()
        .filter_map(|s| match s {
            serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
            _ => None,
        })
        .collect()
}

/// For text too broken to parse: the `key =` on the line of `offset`, under
/// the nearest `[table]` or `[[array]]` header above it.
fn field_by_line(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
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
