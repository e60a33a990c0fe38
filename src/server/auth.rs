//! Who may join: join tokens (any client id) and per-client tokens, compared in constant time.
//! Tokens are never logged.

use std::collections::HashMap;
use std::path::Path;

use subtle::ConstantTimeEq;

/// The accepted tokens. With none configured, anyone may join.
#[derive(Default, Clone)]
pub struct Auth {
    join: Vec<Vec<u8>>,
    per_client: HashMap<String, Vec<u8>>,
}

/// Errors reading a token file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("token file {path}, line {line}: expected `TOKEN` or `CLIENT_ID TOKEN`")]
    Syntax { path: String, line: usize },
}

impl Auth {
    pub fn new(join_tokens: &[String]) -> Self {
        Self { join: join_tokens.iter().map(|t| t.as_bytes().to_vec()).collect(), per_client: HashMap::new() }
    }

    /// Adds tokens from a file: `TOKEN` lines are join tokens, `CLIENT_ID TOKEN` lines bind a
    /// token to one client id; `#` starts a comment.
    pub fn load_file(&mut self, path: &Path) -> Result<(), AuthError> {
        let p = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: p.clone(), source })?;
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                [t] => self.join.push(t.as_bytes().to_vec()),
                [id, t] => {
                    self.per_client.insert((*id).to_string(), t.as_bytes().to_vec());
                }
                _ => return Err(AuthError::Syntax { path: p, line: i + 1 }),
            }
        }
        Ok(())
    }

    /// True when tokens are required.
    pub fn enabled(&self) -> bool {
        !self.join.is_empty() || !self.per_client.is_empty()
    }

    /// Whether `client_id` may join with `token`. Every configured token is compared, each in
    /// constant time, so timing says nothing about which one was close.
    pub fn check(&self, client_id: &str, token: Option<&str>) -> bool {
        if !self.enabled() {
            return true;
        }
        let Some(token) = token else { return false };
        let t = token.as_bytes();
        // An id with a token of its own takes that token only: a join token does not open it.
        if let Some(c) = self.per_client.get(client_id) {
            return c.as_slice().ct_eq(t).into();
        }
        let mut ok = subtle::Choice::from(0u8);
        for j in &self.join {
            ok |= j.as_slice().ct_eq(t);
        }
        ok.into()
    }

    /// Whether `client_id` has a token of its own (then a Hello that passed [`Self::check`]
    /// proves the id).
    pub fn is_bound(&self, client_id: &str) -> bool {
        self.per_client.contains_key(client_id)
    }

    /// Whether `token` is any accepted token (join or per-client): what the HTTP endpoints that
    /// hand out the model or data ask of a request. Constant time per token, like `check`.
    pub fn check_any(&self, token: Option<&str>) -> bool {
        if !self.enabled() {
            return true;
        }
        let Some(token) = token else { return false };
        let t = token.as_bytes();
        let mut ok = subtle::Choice::from(0u8);
        for j in self.join.iter().chain(self.per_client.values()) {
            ok |= j.as_slice().ct_eq(t);
        }
        ok.into()
    }
}

/// Failed tokens per address, with exponential backoff: after [`Throttle::FREE`] failures an
/// address waits 1 s, then 2 s, 4 s, … up to 5 minutes before its next attempt is even
/// checked; a success clears its record. Guessing tokens at line rate (35,000 a second over
/// HTTP before) becomes a handful per minute. Memory is bounded: at most
/// [`Throttle::MAX_ADDRESSES`] addresses are remembered (the oldest records go first).
#[derive(Default)]
pub struct Throttle {
    inner: std::sync::Mutex<HashMap<std::net::IpAddr, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    until: std::time::Instant,
}

impl Throttle {
    pub const FREE: u32 = 3;
    pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
    pub const MAX_ADDRESSES: usize = 65_536;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::IpAddr, Failures>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `ip` must still wait before a token from it is checked (None: not blocked).
    pub fn blocked(&self, ip: std::net::IpAddr) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        self.lock().get(&ip).and_then(|f| (f.until > now).then(|| f.until - now))
    }

    /// Records a failed token from `ip`.
    pub fn failed(&self, ip: std::net::IpAddr) {
        let now = std::time::Instant::now();
        let mut g = self.lock();
        if g.len() >= Self::MAX_ADDRESSES && !g.contains_key(&ip) {
            let oldest = g.iter().min_by_key(|(_, f)| f.until).map(|(k, _)| *k);
            if let Some(k) = oldest {
                g.remove(&k);
            }
        }
        let f = g.entry(ip).or_insert(Failures { count: 0, until: now });
        f.count = f.count.saturating_add(1);
        if f.count > Self::FREE {
            let doublings = (f.count - Self::FREE - 1).min(16);
            let wait = std::time::Duration::from_secs(1 << doublings).min(Self::MAX_WAIT);
            f.until = now + wait;
        }
    }

    /// A token from `ip` was right: its failures are forgotten.
    pub fn succeeded(&self, ip: std::net::IpAddr) {
        self.lock().remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_tokens_back_off_exponentially() {
        let t = Throttle::default();
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..Throttle::FREE {
            assert!(t.blocked(ip).is_none());
            t.failed(ip);
        }
        assert!(t.blocked(ip).is_none(), "the first failures are free");
        t.failed(ip);
        let w1 = t.blocked(ip).expect("blocked");
        t.failed(ip);
        let w2 = t.blocked(ip).expect("blocked");
        assert!(
            w1 <= std::time::Duration::from_secs(1) && w2 > std::time::Duration::from_secs(1),
            "{w1:?} {w2:?}"
        );
        for _ in 0..40 {
            t.failed(ip);
        }
        assert!(t.blocked(ip).unwrap() <= Throttle::MAX_WAIT);
        assert!(t.blocked("10.0.0.2".parse().unwrap()).is_none(), "other addresses are not affected");
        t.succeeded(ip);
        assert!(t.blocked(ip).is_none());
    }

    #[test]
    fn tokens() {
        assert!(Auth::default().check("a", None));
        let mut a = Auth::new(&["join".into()]);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "# tokens\nalice s3cret\nshared2\n").unwrap();
        a.load_file(f.path()).unwrap();
        assert!(a.check("bob", Some("join")));
        assert!(a.check("bob", Some("shared2")));
        assert!(a.check("alice", Some("s3cret")));
        assert!(!a.check("bob", Some("s3cret")));
        assert!(!a.check("bob", Some("joi")));
        assert!(!a.check("bob", None));
        assert!(a.check_any(Some("s3cret")) && a.check_any(Some("join")));
        assert!(!a.check_any(Some("s3cre")) && !a.check_any(None));
        assert!(Auth::default().check_any(None));
        std::fs::write(f.path(), "a b c\n").unwrap();
        assert!(matches!(Auth::default().load_file(f.path()), Err(AuthError::Syntax { line: 1, .. })));
    }
}
