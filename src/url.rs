//! The URLs hark takes from its configuration: transcription endpoints (`http://`, `https://`,
//! with a path and a query such as Azure's `?api-version=...`) and MQTT brokers (`mqtt://`,
//! `mqtts://`). One splitter ([`split`]) finds the userinfo, host, port, path, query and fragment;
//! on it stand the endpoint scheme check ([`scheme_ok`]), the broker parser ([`Broker::parse`]),
//! the loopback check ([`is_loopback`]) and redaction for logs and events ([`redact`]).
//!
//! Deliberately not here: validating an endpoint beyond its scheme (the configuration accepts any
//! `http(s)://` text with something after `://`, and the HTTP client reports a bad host or port
//! when it connects), percent-decoding anything but a broker's user and password, IDNA, name
//! resolution, and normalising (an endpoint is sent as written, with the route appended).
//! Errors never quote the URL: it may hold a password (quote [`redact`]'s output instead).

use std::fmt;

/// A URL cut at its delimiters. Nothing is validated: every part is a slice of the text given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parts<'a> {
    /// Before `://`; `None` when there is no `://`.
    pub(crate) scheme: Option<&'a str>,
    /// Before the last `@` of the authority (`user:password`).
    pub(crate) userinfo: Option<&'a str>,
    /// `host[:port]`, without the userinfo.
    pub(crate) authority: &'a str,
    /// A name, an IPv4 address, or an IPv6 address with its brackets (`[::1]`). An unclosed
    /// bracket leaves the whole authority here.
    pub(crate) host: &'a str,
    /// The text after the port's `:`, unchecked.
    pub(crate) port: Option<&'a str>,
    /// Everything before the path: `scheme://userinfo@host:port`.
    pub(crate) origin: &'a str,
    /// From the first `/` after the authority to the query or fragment; may be empty.
    pub(crate) path: &'a str,
    /// After `?`, without it.
    pub(crate) query: Option<&'a str>,
    /// After `#`, without it.
    pub(crate) fragment: Option<&'a str>,
}

/// Cut `url` into its parts. Without `://` the text is taken as starting at the authority.
///
/// The authority ends at the first `/`, `?` or `#`; the userinfo ends at its last `@`. A host in
/// brackets ends at the first `]` (what follows it, up to a `:`, is ignored); any other host ends
/// at the authority's last `:`.
pub(crate) fn split(url: &str) -> Parts<'_> {
    let (scheme, rest, rest_at) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest, scheme.len() + 3),
        None => (None, url, 0),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (full_authority, tail) = rest.split_at(authority_end);
    let (userinfo, authority) = match full_authority.rsplit_once('@') {
        Some((user, authority)) => (Some(user), authority),
        None => (None, full_authority),
    };
    let (host, port) = if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => (&authority[..=end], authority[end + 1..].strip_prefix(':')),
            None => (authority, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let (before_fragment, fragment) = match tail.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (tail, None),
    };
    let (path, query) = match before_fragment.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (before_fragment, None),
    };
    Parts {
        scheme,
        userinfo,
        authority,
        host,
        port,
        origin: &url[..rest_at + authority_end],
        path,
        query,
        fragment,
    }
}

/// The `host[:port]` of a URL, without the userinfo.
pub(crate) fn authority(url: &str) -> &str {
    split(url).authority
}

/// The host of a URL, without the userinfo and the port (IPv6 addresses keep their brackets).
pub(crate) fn host_of(url: &str) -> &str {
    split(url).host
}

/// The schemes of one kind of URL hark takes, with their `://`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A transcription endpoint: `http://` or `https://`.
    Http,
    /// An MQTT broker: `mqtt://` or `mqtts://`.
    Mqtt,
}

impl Kind {
    /// The plain and the TLS scheme, as they start a URL.
    pub(crate) fn schemes(self) -> [&'static str; 2] {
        match self {
            Kind::Http => ["http://", "https://"],
            Kind::Mqtt => ["mqtt://", "mqtts://"],
        }
    }
}

/// Whether `url` starts with one of `kind`'s schemes (lowercase, as written) and has something
/// after it. All the configuration asks of an endpoint; a broker is then parsed in full.
pub(crate) fn scheme_ok(url: &str, kind: Kind) -> bool {
    kind.schemes()
        .iter()
        .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()))
}

/// Whether a URL's host is a loopback address (`localhost`, `127.0.0.0/8`, `[::1]`), where a key
/// sent over plain HTTP never leaves the machine. An IPv6 address counts only in brackets.
pub(crate) fn is_loopback(url: &str) -> bool {
    let host = host_of(url);
    if !host.starts_with('[') && host.contains(':') {
        return false;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// `url` with its userinfo (`user:password@`) replaced by `***@`, for logs, events and error
/// messages. Text without `://` is redacted up to its last `@` (it may be a URL whose scheme
/// was left out).
pub(crate) fn redact(url: &str) -> String {
    let parts = split(url);
    match (parts.scheme, parts.userinfo) {
        (_, None) => url.to_owned(),
        (Some(scheme), Some(_)) => {
            let rest = &url[parts.origin.len()..];
            format!("{scheme}://***@{}{rest}", parts.authority)
        }
        (None, Some(_)) => match url.rfind('@') {
            Some(at) => format!("***@{}", &url[at + 1..]),
            None => url.to_owned(),
        },
    }
}

/// Where an MQTT broker is, from `mqtt://[user[:password]@]host[:port][/]` (port 1883) or
/// `mqtts://...` (8883). The user and password are percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Broker {
    pub(crate) tls: bool,
    /// A name, an IPv4 address, or an IPv6 address in brackets.
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<Password>,
}

/// A password, never printed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Password(String);

impl Password {
    /// The password itself, for the one place that sends it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `%XX` escapes decoded; `None` if one is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Broker {
    /// The reasons for an error never quote the URL, which may hold a password.
    pub(crate) fn parse(url: &str) -> Result<Broker, String> {
        let parts = split(url);
        let tls = match parts.scheme {
            Some("mqtts") => true,
            Some("mqtt") => false,
            _ => return Err("must start with mqtt:// or mqtts://".into()),
        };
        let tail = &url[parts.origin.len()..];
        if !(tail.is_empty() || tail == "/") {
            return Err("takes no path or query: mqtt://host:port".into());
        }
        let (user, password) = match parts.userinfo {
            None => (None, None),
            Some(u) => {
                let (user, password) = match u.split_once(':') {
                    Some((user, pw)) => (user, Some(pw)),
                    None => (u, None),
                };
                let bad = || "has a malformed %-escape in its user or password".to_owned();
                let user = percent_decode(user).ok_or_else(bad)?;
                let password = match password {
                    Some(pw) => Some(Password(percent_decode(pw).ok_or_else(bad)?)),
                    None => None,
                };
                (Some(user).filter(|u| !u.is_empty()), password)
            }
        };
        let host = parts.host;
        if host.starts_with('[') && !host.ends_with(']') {
            return Err("an IPv6 address needs its closing ]".into());
        }
        if host.is_empty() || host == "[]" {
            return Err("has no host".into());
        }
        let port = match parts.port {
            None if tls => 8883,
            None => 1883,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("port must be 1..=65535, got {p:?}")),
            },
        };
        Ok(Broker {
            tls,
            host: host.to_owned(),
            port,
            user,
            password,
        })
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_of_endpoints() {
        let p = split("https://u:p@w@api.example.com:8443/v1/x?api-version=2024-06-01#frag");
        assert_eq!(p.scheme, Some("https"));
        assert_eq!(p.userinfo, Some("u:p@w"));
        assert_eq!(p.authority, "api.example.com:8443");
        assert_eq!((p.host, p.port), ("api.example.com", Some("8443")));
        assert_eq!(p.origin, "https://u:p@w@api.example.com:8443");
        assert_eq!(p.path, "/v1/x");
        assert_eq!(p.query, Some("api-version=2024-06-01"));
        assert_eq!(p.fragment, Some("frag"));

        let p = split("http://h?x=1");
        assert_eq!(
            (p.host, p.port, p.path, p.query),
            ("h", None, "", Some("x=1"))
        );
        assert_eq!(p.origin, "http://h");
        let p = split("http://h/v1#a?b");
        assert_eq!((p.path, p.query, p.fragment), ("/v1", None, Some("a?b")));
    }

    #[test]
    fn hosts_and_ports() {
        let hp = |url| {
            let p = split(url);
            (p.host, p.port)
        };
        assert_eq!(hp("http://[::1]:9000/v1"), ("[::1]", Some("9000")));
        assert_eq!(hp("http://[::1]"), ("[::1]", None));
        assert_eq!(
            hp("http://[fe80::1%25eth0]:80"),
            ("[fe80::1%25eth0]", Some("80"))
        );
        // What follows `]` other than a port is ignored, as it always was.
        assert_eq!(hp("mqtt://[::1]x"), ("[::1]", None));
        assert_eq!(hp("http://[::1"), ("[::1", None));
        assert_eq!(hp("http://127.0.0.1:8000"), ("127.0.0.1", Some("8000")));
        assert_eq!(hp("http://h:"), ("h", Some("")));
        assert_eq!(hp("http://h:port/x"), ("h", Some("port")));
        // An unbracketed host ends at the last `:`.
        assert_eq!(hp("mqtt://::1:1883"), ("::1", Some("1883")));
        assert_eq!(hp("http://user:pw@h:80"), ("h", Some("80")));
        // No scheme: the text starts at the authority.
        assert_eq!(hp("localhost:8000/v1"), ("localhost", Some("8000")));
        assert_eq!(split("localhost:8000/v1").scheme, None);
        assert_eq!(hp(""), ("", None));
        assert_eq!(host_of("https://API.openai.com/v1"), "API.openai.com");
        assert_eq!(
            authority("https://k@api.openai.com:443/v1"),
            "api.openai.com:443"
        );
    }

    #[test]
    fn endpoint_schemes() {
        for ok in [
            "http://h",
            "https://h/v1",
            "https:///v1",
            "http://[::1]:8000",
        ] {
            assert!(scheme_ok(ok, Kind::Http), "{ok}");
        }
        for bad in [
            "", "h/v1", "https://", "ftp://h", "HTTP://h", "http:/h", "mqtt://h",
        ] {
            assert!(!scheme_ok(bad, Kind::Http), "{bad}");
        }
        assert!(scheme_ok("mqtts://b", Kind::Mqtt));
        assert!(!scheme_ok("mqtt://", Kind::Mqtt));
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        for url in [
            "http://127.0.0.1:8000/v1",
            "http://127.3.4.5/v1",
            "http://localhost/v1",
            "http://LocalHost:8000/v1",
            "http://[::1]:9000/v1",
            "http://[::1]",
            "http://user:pw@127.0.0.1/v1",
        ] {
            assert!(is_loopback(url), "{url}");
        }
        for url in [
            "http://10.0.0.1/v1",
            "http://example.com/v1",
            "http://127.0.0.1.example.com/v1",
            "http://[fe80::1]/v1",
            "http://[é",
            "http://::1:8000/v1",
            "http://localhost@example.com/v1",
            "",
        ] {
            assert!(!is_loopback(url), "{url}");
        }
    }

    #[test]
    fn redaction_hides_userinfo_only() {
        assert_eq!(
            redact("https://u:hunter2@example.com/v1"),
            "https://***@example.com/v1"
        );
        assert_eq!(
            redact("mqtt://u:p@ss@broker:1883"),
            "mqtt://***@broker:1883"
        );
        assert_eq!(redact("mqtts://hark@b"), "mqtts://***@b");
        // An `@` after the authority is not userinfo.
        assert_eq!(redact("https://h/v1?to=a@b"), "https://h/v1?to=a@b");
        assert_eq!(redact("https://h/a@b"), "https://h/a@b");
        assert_eq!(redact("https://example.com/v1"), "https://example.com/v1");
        assert_eq!(redact("ftp://u:pw@h/x"), "ftp://***@h/x");
        // Without a scheme, everything up to the last `@` could be a password.
        assert_eq!(redact("u:hunter2@example.com/v1"), "***@example.com/v1");
        assert_eq!(redact("plain"), "plain");
        assert_eq!(redact(""), "");
    }

    #[test]
    fn broker_urls() {
        let b = |url: &str| Broker::parse(url);
        assert_eq!(
            b("mqtt://broker.lan").unwrap(),
            Broker {
                tls: false,
                host: "broker.lan".into(),
                port: 1883,
                user: None,
                password: None,
            }
        );
        let with_login = b("mqtts://hark:p%40ss%3Aword@broker:8884").unwrap();
        assert_eq!(with_login.user.as_deref(), Some("hark"));
        assert_eq!(with_login.password, Some(Password("p@ss:word".into())));
        assert_eq!(with_login.to_string(), "mqtts://broker:8884");
        assert!(!format!("{with_login:?}").contains("p@ss"));
        assert_eq!(b("mqtt://hark@broker").unwrap().password, None);
        assert_eq!(b("mqtt://:pw@broker").unwrap().user, None);
        assert_eq!(b("mqtts://10.0.0.2/").unwrap().port, 8883);
        assert_eq!(b("mqtts://10.0.0.2:8884").unwrap().port, 8884);
        let v6 = b("mqtt://[::1]:1884").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("[::1]", 1884));
        assert_eq!(b("mqtt://[::1]").unwrap().port, 1883);
        assert_eq!(v6.to_string(), "mqtt://[::1]:1884");
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:port",
            "mqtt://h:65536",
            "mqtt://h:1883/topic",
            "mqtt://h//",
            "mqtt://h?x",
            "mqtt://u:pw%zz@h",
            "mqtt://[::1",
            "mqtt://[]",
            "broker:1883",
        ] {
            assert!(b(bad).is_err(), "{bad}");
        }
        let e = b("mqtt://u:hunter2@h:x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let e = b("mqtt://u:hunter2@h/x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn broker_errors_say_what_is_wrong() {
        let why = |url: &str| Broker::parse(url).unwrap_err();
        assert_eq!(why("tcp://h"), "must start with mqtt:// or mqtts://");
        assert_eq!(
            why("mqtt://h/t"),
            "takes no path or query: mqtt://host:port"
        );
        assert_eq!(
            why("mqtt://%zz@h"),
            "has a malformed %-escape in its user or password"
        );
        assert_eq!(
            why("mqtt://[::1:1883"),
            "an IPv6 address needs its closing ]"
        );
        assert_eq!(why("mqtt://u@"), "has no host");
        assert_eq!(
            why("mqtt://h:99999"),
            r#"port must be 1..=65535, got "99999""#
        );
    }
}
