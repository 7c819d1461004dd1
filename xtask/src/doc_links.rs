//! The documents' links between themselves resolve: every relative link in README.md and
//! docs/*.md names a file that exists and, with `#anchor`, a heading of that file (GitHub's
//! anchors: lower case, punctuation but `-` and `_` dropped, spaces as `-`). The README is
//! short and points into docs/: a moved section must not leave a dead link behind.

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::{Path, PathBuf},
    };

    use crate::workspace_root;

    /// GitHub's anchor of a heading's text.
    fn anchor(heading: &str) -> String {
        heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect()
    }

    /// The text outside fenced code blocks (a shell example's `[x](y)` is not a link).
    fn prose(text: &str) -> Vec<&str> {
        let mut fenced = false;
        text.lines()
            .filter(|line| {
                if line.trim_start().starts_with("```") {
                    fenced = !fenced;
                    return false;
                }
                !fenced
            })
            .collect()
    }

    fn anchors(text: &str) -> Vec<String> {
        prose(text)
            .into_iter()
            .filter_map(|line| line.strip_prefix('#'))
            .map(|heading| anchor(heading.trim_start_matches('#').replace('`', "").as_str()))
            .collect()
    }

    /// The targets of `[text](target)` links, inline code left out.
    fn links(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in prose(text) {
            let line: String = line.split('`').step_by(2).collect::<Vec<_>>().join("");
            let mut rest = line.as_str();
            while let Some(start) = rest.find("](") {
                rest = &rest[start + 2..];
                if let Some(end) = rest.find(')') {
                    out.push(rest[..end].to_owned());
                    rest = &rest[end..];
                }
            }
        }
        out
    }

    fn documents(root: &Path) -> Vec<PathBuf> {
        let mut docs = vec![root.join("README.md")];
        for entry in fs::read_dir(root.join("docs")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "md") {
                docs.push(path);
            }
        }
        docs
    }

    #[test]
    fn every_relative_link_in_the_documents_resolves() {
        let root = workspace_root();
        let mut dead = Vec::new();
        for doc in documents(&root) {
            let text = fs::read_to_string(&doc).unwrap();
            for link in links(&text) {
                if link.contains("://") || link.starts_with("mailto:") {
                    continue;
                }
                let (file, fragment) = link.split_once('#').unwrap_or((&link, ""));
                let target = if file.is_empty() {
                    doc.clone()
                } else {
                    doc.parent().unwrap().join(file)
                };
                let shown = format!("{}: {link}", doc.strip_prefix(&root).unwrap().display());
                if !target.exists() {
                    dead.push(format!("{shown} (no such file)"));
                } else if !fragment.is_empty()
                    && target.extension().is_some_and(|e| e == "md")
                    && !anchors(&fs::read_to_string(&target).unwrap()).contains(&fragment.into())
                {
                    dead.push(format!("{shown} (no such heading)"));
                }
            }
        }
        assert!(dead.is_empty(), "dead links:\n{}", dead.join("\n"));
    }

    #[test]
    fn anchors_are_githubs() {
        assert_eq!(anchor(" Under overload"), "under-overload");
        assert_eq!(
            anchor("The boot's integrity cost: observer profile --since-start"),
            "the-boots-integrity-cost-observer-profile---since-start"
        );
        assert_eq!(links("see [a](docs/x.md#y) and `[b](c)`"), ["docs/x.md#y"]);
    }
}
