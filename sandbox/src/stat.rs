//! What `/proc/<pid>/stat` says of a process, parsed in one place: its state, its parent and
//! its start time, which with the pid tells a process apart from a later one given the same
//! pid (the deployer's records of instances, the children an upgrade in place leaves).
//!
//! The command (field 2) is in parentheses and may hold spaces and parentheses itself, so
//! the fields are counted from the last `)`: the state is field 3, the parent's pid field 4,
//! the start time (clock ticks after boot) field 22.

/// The fields of a process's stat that revboot reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `Z` for a zombie, …).
    pub state: char,
    /// The parent's pid.
    pub parent: u32,
    /// When it started, in clock ticks after boot.
    pub start_time: u64,
}

/// The stat of process `pid`; `None` when it is gone (or its stat cannot be read).
pub fn read(pid: u32) -> Option<Stat> {
    parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses the text of a stat file.
pub fn parse(stat: &str) -> Option<Stat> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        parent: fields.get(4 - 3)?.parse().ok()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_with_spaces_and_parentheses_is_skipped_whole() {
        let text = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000000 200 18446744073709551615";
        assert_eq!(
            parse(text),
            Some(Stat {
                state: 'S',
                parent: 17,
                start_time: 987_654
            })
        );
        assert_eq!(parse("4242 (cut short) S 17"), None);
        assert_eq!(parse("no parentheses"), None);
    }

    #[test]
    fn reads_its_own() {
        let own = read(std::process::id()).expect("own stat");
        assert_eq!(own.parent, std::os::unix::process::parent_id());
        assert!(own.start_time > 0);
        assert_eq!(read(u32::MAX), None);
    }
}
