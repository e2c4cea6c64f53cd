//! Plain aligned text tables and human-readable sizes for s2dctl output.

pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.len());
                }
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Key/value lines, values aligned two spaces after the longest key:
/// `name        vol1`.
pub fn pairs(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    rows.iter().map(|(k, v)| format!("{k:<w$} {v}\n")).collect()
}

/// `-` for an empty field, so columns never look shifted.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// Sizes in binary units: 10 GiB, 512 MiB, 4 KiB, 0 B.
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned() {
        let mut t = Table::new(&["NAME", "SIZE"]);
        t.row(vec!["a-long-name".into(), "1 GiB".into()]);
        t.row(vec!["b".into(), "2 GiB".into()]);
        let s = t.render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "NAME         SIZE");
        assert_eq!(lines[2], "b            2 GiB");
    }

    #[test]
    fn pairs_are_aligned() {
        let s = pairs(&[("name", "a".into()), ("block size", "512".into())]);
        assert_eq!(s, "name        a\nblock size  512\n");
    }

    #[test]
    fn empty_fields_are_dashes() {
        assert_eq!(or_dash(""), "-");
        assert_eq!(or_dash("x"), "x");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(10 << 30), "10.0 GiB");
        assert_eq!(human(0), "0 B");
    }
}
