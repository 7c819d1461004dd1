//! Tables a judge leaves for the host to keep (under target/bench/): printed on the console
//! between `REPORT-BEGIN <file>` and `REPORT-END`, since nothing else leaves the guest.

/// Prints `text` as the report the host saves as `file`.
pub fn print(file: &str, text: &str) {
    println!("REPORT-BEGIN {file}\n{text}\nREPORT-END");
}

/// The reports on a console: (file, text) in order.
pub fn read(console: &str) -> Vec<(&str, String)> {
    let mut reports = Vec::new();
    let mut lines = console.lines();
    while let Some(line) = lines.next() {
        let Some(file) = line.trim().strip_prefix("REPORT-BEGIN ") else {
            continue;
        };
        let text: Vec<&str> = lines
            .by_ref()
            .take_while(|l| l.trim() != "REPORT-END")
            .collect();
        reports.push((file.trim(), text.join("\n")));
    }
    reports
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_round_trip() {
        let console = "noise\nREPORT-BEGIN vm-phases-6.12.md\n| a |\n| b |\nREPORT-END\nmore\n";
        assert_eq!(
            super::read(console),
            [("vm-phases-6.12.md", "| a |\n| b |".to_owned())]
        );
    }
}
