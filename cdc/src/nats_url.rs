//! Credentials in `nats.url`: `nats://user:password@host:port` or `nats://token@host:port`.
//!
//! async-nats 0.51 neither uses credentials written in the URL nor keeps them out of its
//! debug log (it logs the server address it connects to). So they are taken out of the URL
//! here and handed to the client as options; the client only ever sees bare addresses.

use async_nats::ConnectOptions;

/// Credentials found in a NATS URL.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsCredentials {
    /// `user:password@`.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// `token@`.
    Token(String),
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        match self {
            NatsCredentials::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsCredentials::Token(_) => write!(f, "Token(***)"),
        }
    }
}

/// Splits `url` (comma-separated servers) into the addresses without credentials and the
/// credentials of the first server that has any.
pub fn split_credentials(url: &str) -> (String, Option<NatsCredentials>) {
    let mut found = None;
    for server in url.split(',') {
        let server = server.trim();
        let after_scheme = server.find("://").map_or(0, |i| i + 3);
        if let Some(at) = server.rfind('@').filter(|at| *at >= after_scheme) {
            let userinfo = &server[after_scheme..at];
            if found.is_none() && !userinfo.is_empty() {
                found = Some(match userinfo.split_once(':') {
                    Some((user, password)) => NatsCredentials::UserPassword {
                        user: percent_decode(user),
                        password: percent_decode(password),
                    },
                    None => NatsCredentials::Token(percent_decode(userinfo)),
                });
            }
        }
    }
    (crate::publish::redact_url(url), found)
}

/// `options` with the credentials of `url` applied; returns them with the addresses to
/// connect to (no credentials).
pub fn connect_options(options: ConnectOptions, url: &str) -> (ConnectOptions, String) {
    let (servers, credentials) = split_credentials(url);
    let options = match credentials {
        None => options,
        Some(NatsCredentials::UserPassword { user, password }) => {
            options.user_and_password(user, password)
        }
        Some(NatsCredentials::Token(token)) => options.token(token),
    };
    (options, servers)
}

/// Decodes `%XX` escapes (URL userinfo); anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url() {
        let (servers, creds) = split_credentials("nats://cdc:p%40ss@h1:4222,nats://h2:4222");
        assert_eq!(servers, "nats://h1:4222,nats://h2:4222");
        assert_eq!(
            creds,
            Some(NatsCredentials::UserPassword {
                user: "cdc".into(),
                password: "p@ss".into()
            })
        );
        let (servers, creds) = split_credentials("nats://s3cr3t@h:4222");
        assert_eq!(servers, "nats://h:4222");
        assert_eq!(creds, Some(NatsCredentials::Token("s3cr3t".into())));
        assert!(!format!("{creds:?}").contains("s3cr3t"));
        assert_eq!(
            split_credentials("nats://h:4222"),
            ("nats://h:4222".into(), None)
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }
}
