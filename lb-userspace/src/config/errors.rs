//! Where a configuration problem is: `ConfigError` (file, line, field,
//! message), `FieldError` (a field path before it is placed in a file) and
//! `LimitError` (a change past `[limits]`).

use std::fmt;

/// A configuration problem: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or "request body" for the API.
    pub source: String,
    /// 1-based line and column, when the input is a file.
    pub position: Option<(usize, usize)>,
    /// The field, as a path: `services[0].backends[1].weight`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A field error before it is placed in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: Vec<Seg>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

pub(super) fn path_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// `field: message`, for errors with no file or body to place them in.
impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", path_string(&self.path), self.message)
        }
    }
}

impl FieldError {
    pub(super) fn new(path: &[Seg], message: impl Into<String>) -> Self {
        Self {
            path: path.to_vec(),
            message: message.into(),
        }
    }

    /// Places the error in a non-file input (an API request body).
    pub fn in_body(self) -> ConfigError {
        ConfigError {
            source: "request body".into(),
            position: None,
            field: path_string(&self.path),
            message: self.message,
        }
    }
}

pub(super) fn key(path: &[Seg], k: &str) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Key(k.into()));
    p
}

pub(super) fn index(path: &[Seg], i: usize) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Index(i));
    p
}

/// A change that would take on more than `[limits]` allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what}: more than {key} = {limit}; remove some, or raise {key} in the config file's \
     [limits] and reload{note}"
)]
pub struct LimitError {
    /// The config key: `limits.max_services` and the like.
    pub key: &'static str,
    pub limit: usize,
    /// What is over the limit, counted: `3 services`.
    pub what: String,
    /// The first item past the limit.
    pub path: Vec<Seg>,
    /// What else bounds the key, if anything.
    pub note: &'static str,
}
