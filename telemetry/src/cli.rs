//! Command-line flags for both binaries: `--flag value` and `--flag=value`
//! (manifests tend to use the second), with errors that show the usage.

use std::net::SocketAddr;
use std::time::Duration;

pub struct Args {
    items: std::vec::IntoIter<String>,
    usage: &'static str,
}

impl Args {
    /// This process's arguments; `usage` is printed with every error and for `--help`.
    pub fn from_env(usage: &'static str) -> Self {
        Args {
            items: split_flag_values(std::env::args().skip(1)).into_iter(),
            usage,
        }
    }

    /// The next flag.
    pub fn next_flag(&mut self) -> Option<String> {
        self.items.next()
    }

    pub fn value(&mut self, flag: &str) -> String {
        match self.items.next() {
            Some(v) => v,
            None => self.fail(&format!("{flag} needs a value")),
        }
    }

    pub fn number(&mut self, flag: &str) -> u64 {
        let v = self.value(flag);
        v.parse()
            .unwrap_or_else(|_| self.fail(&format!("{flag}: {v:?} is not a whole number")))
    }

    pub fn seconds(&mut self, flag: &str) -> Duration {
        Duration::from_secs(self.number(flag))
    }

    pub fn addr(&mut self, flag: &str) -> SocketAddr {
        let v = self.value(flag);
        v.parse()
            .unwrap_or_else(|_| self.fail(&format!("{flag}: {v:?} is not an address:port")))
    }

    /// Prints the usage and exits successfully.
    pub fn help(&self) -> ! {
        print!("{}", self.usage);
        std::process::exit(0)
    }

    /// Prints the problem and the usage, and exits with status 2.
    pub fn fail(&self, problem: &str) -> ! {
        eprintln!("{problem}\n\n{}", self.usage);
        std::process::exit(2)
    }
}

fn split_flag_values(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    for arg in args {
        match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                out.push(flag.to_string());
                out.push(value.to_string());
            }
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn flag_values_split_at_the_first_equals_sign() {
        let args = ["--a=1", "--b", "2", "--c=x=y", "plain=1"].map(String::from);
        assert_eq!(
            super::split_flag_values(args.into_iter()),
            ["--a", "1", "--b", "2", "--c", "x=y", "plain=1"]
        );
    }
}
