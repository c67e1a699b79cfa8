//! Where every figure goes: terminal tables, `results.json` (each figure
//! with an id and unit, so runs can be compared), and `BENCHMARKS.md`.
use std::{fmt::Write as _, fs, path::Path};

use crate::results::{Figure, FigureId, Meta, Results, Sections};

/// A table as printed, and as written to the markdown report.
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// How the figures were measured, under the table.
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, header: &[&str]) -> Self {
        Self {
            title: title.into(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < w.len() {
                    w[i] = w[i].max(c.chars().count());
                }
            }
        }
        w
    }

    pub fn print(&self) {
        let w = self.widths();
        println!("\n{}", self.title);
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let pad = w[i].saturating_sub(c.chars().count());
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str("  ");
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            println!("{}", s.trim_end());
        };
        line(&self.header);
        println!(
            "{}",
            "-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1))
        );
        for r in &self.rows {
            line(r);
        }
        for n in &self.notes {
            println!("  * {n}");
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.title);
        let _ = writeln!(s, "| {} |", self.header.join(" | "));
        let aligns: Vec<&str> = (0..self.header.len())
            .map(|i| if i == 0 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(s, "| {} |", aligns.join(" | "));
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s.push('\n');
        s
    }
}

#[derive(Default)]
pub struct Report {
    pub tables: Vec<Table>,
    pub figures: Vec<Figure>,
    /// Detailed rows per section, for results.json and the chart.
    pub sections: Sections,
    /// Things that did not run (a peer that could not be installed...).
    pub skipped: Vec<String>,
}

impl Report {
    pub fn figure(&mut self, id: FigureId, value: f64) {
        self.figures.push(Figure {
            id,
            value,
            unit: id.unit(),
        });
    }

    pub fn table(&mut self, t: Table) {
        t.print();
        self.tables.push(t);
    }

    pub fn skip(&mut self, what: impl Into<String>) {
        let w = what.into();
        println!("bench: skipped: {w}");
        self.skipped.push(w);
    }

    /// results.json. JSON has no NaN or infinity: serde_json writes such a
    /// figure as null, which the smoke test rejects.
    pub fn write_json(&self, path: &Path, meta: &Meta) -> std::io::Result<()> {
        let results = Results {
            schema: 1,
            meta,
            skipped: &self.skipped,
            sections: &self.sections,
            figures: &self.figures,
        };
        let text = serde_json::to_string_pretty(&results).map_err(std::io::Error::other)?;
        fs::write(path, text + "\n")
    }
}

/// Formats with a precision that suits the magnitude.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", v);
        // Thousands separators for readability.
        let (sign, digits) = s.split_at(if v < 0.0 { 1 } else { 0 });
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(ch);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A ratio, as "1.23x".
pub fn ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}x")
    } else {
        "-".into()
    }
}

/// Keeps the hand-written part of an existing report between these markers
/// when the report is written again.
pub const NOTES_BEGIN: &str = "<!-- notes:begin (kept when the bench rewrites this file) -->";
pub const NOTES_END: &str = "<!-- notes:end -->";

pub fn preserved_notes(existing: &str) -> Option<String> {
    let start = existing.find(NOTES_BEGIN)?;
    let end = existing.find(NOTES_END)?;
    (end > start).then(|| existing[start..end + NOTES_END.len()].to_string())
}
