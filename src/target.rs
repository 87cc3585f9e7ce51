//! What a log's URL points at: one Redis server, a Sentinel group or a Redis Cluster.
//!
//! The URL forms are the ones Centrifuge and other Redis clients read:
//! `redis+cluster://[user:pass@]host:port[?addr=host2:port2&…]` and
//! `redis+sentinel://[user:pass@]host:port[/db]?sentinel_master_name=NAME[&addr=…]`, each also
//! as `rediss+…` for TLS. Everything else in the URL (password, db, TLS options) is read as
//! redis-rs reads a `redis://` URL and applies to every node; the sentinels themselves take
//! `sentinel_username` / `sentinel_password` when they need a login of their own.

use redis::{
    ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, RedisResult,
};

#[derive(Clone)]
pub enum Target {
    Single(ConnectionInfo),
    /// Sentinels to ask where the master named `master_name` is; `node` is the master's
    /// login, database and TLS, with a placeholder address.
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master_name: String,
        node: ConnectionInfo,
    },
    /// Nodes to learn the cluster's topology from: any one that answers is enough.
    Cluster(Vec<ConnectionInfo>),
}

impl Target {
    pub fn parse(url: &str) -> RedisResult<Target> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.into_connection_info().map(Target::Single);
        };
        let (base, mode) = match scheme.split_once('+') {
            Some((base @ ("redis" | "rediss"), mode @ ("cluster" | "sentinel"))) => (base, mode),
            _ => return url.into_connection_info().map(Target::Single),
        };
        // A fragment (`#insecure`) follows the query; it goes back on each node's URL.
        let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut extra_addresses = Vec::new();
        let mut master_name = None;
        let mut sentinel_login = (None, None);
        let mut kept = Vec::new();
        for param in query.split('&').filter(|param| !param.is_empty()) {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            let value = percent_decoded(value)?;
            match name {
                "addr" => extra_addresses.push(value),
                "sentinel_master_name" => master_name = Some(value),
                "sentinel_username" => sentinel_login.0 = Some(value),
                "sentinel_password" => sentinel_login.1 = Some(value),
                _ => kept.push(param),
            }
        }
        let mut first = format!("{base}://{location}");
        if !kept.is_empty() {
            first.push('?');
            first.push_str(&kept.join("&"));
        }
        if !fragment.is_empty() {
            first.push('#');
            first.push_str(fragment);
        }
        let first = first.as_str().into_connection_info()?;
        let mut nodes = vec![first.clone()];
        for address in &extra_addresses {
            nodes.push(with_address(&first, address)?);
        }
        match mode {
            "cluster" => Ok(Target::Cluster(nodes)),
            _ => {
                let master_name = master_name.filter(|name| !name.is_empty()).ok_or_else(|| {
                    invalid("a redis+sentinel:// URL needs sentinel_master_name=<name>")
                })?;
                let sentinel_settings = redis::RedisConnectionInfo::default();
                let sentinel_settings = match sentinel_login {
                    (username, Some(password)) => {
                        let settings = sentinel_settings.set_password(password);
                        match username {
                            Some(username) => settings.set_username(username),
                            None => settings,
                        }
                    }
                    _ => sentinel_settings,
                };
                let sentinels = nodes
                    .into_iter()
                    .map(|node| node.set_redis_settings(sentinel_settings.clone()))
                    .collect();
                Ok(Target::Sentinel {
                    sentinels,
                    master_name,
                    node: first,
                })
            }
        }
    }

    /// The one server's address, for a plain URL.
    pub fn single(&self) -> Option<&ConnectionInfo> {
        match self {
            Target::Single(info) => Some(info),
            _ => None,
        }
    }

    /// The login used on the Redis nodes, whose password is scrubbed from error messages.
    pub fn node_info(&self) -> &ConnectionInfo {
        match self {
            Target::Single(info) | Target::Sentinel { node: info, .. } => info,
            Target::Cluster(nodes) => &nodes[0],
        }
    }
}

/// `info` with its host and port replaced by those of `address` ("host:port").
pub fn with_address(info: &ConnectionInfo, address: &str) -> RedisResult<ConnectionInfo> {
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .ok_or_else(|| invalid("addr= takes host:port"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    Ok(info.clone().set_addr(addr))
}

fn percent_decoded(value: &str) -> RedisResult<String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte == b'%' {
            let hex = value
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| invalid("a bad %-escape in the query"))?;
            decoded.push(hex);
            index += 3;
        } else {
            decoded.push(if byte == b'+' { b' ' } else { byte });
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| invalid("a query value that is not UTF-8"))
}

fn invalid(detail: &'static str) -> RedisError {
    RedisError::from((
        ErrorKind::InvalidClientConfig,
        "invalid URL",
        detail.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::Target;
    use redis::ConnectionAddr;

    fn address(info: &redis::ConnectionInfo) -> (String, u16) {
        match info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                (host.clone(), *port)
            }
            _ => panic!("not TCP"),
        }
    }

    #[test]
    fn cluster_urls_name_every_seed_node_with_one_login() {
        let Ok(Target::Cluster(nodes)) =
            Target::parse("redis+cluster://u:p@a:7000?addr=b:7001&addr=%5B::1%5D:7002")
        else {
            panic!("not a cluster")
        };
        let found: Vec<_> = nodes.iter().map(address).collect();
        assert_eq!(
            found,
            [("a".into(), 7000), ("b".into(), 7001), ("::1".into(), 7002)]
        );
        assert!(nodes
            .iter()
            .all(|n| n.redis_settings().password() == Some("p")));
    }

    #[test]
    fn sentinel_urls_need_a_master_name_and_keep_the_master_login() {
        assert!(Target::parse("redis+sentinel://s:26379").is_err());
        let Ok(Target::Sentinel {
            sentinels,
            master_name,
            node,
        }) = Target::parse(
            "rediss+sentinel://:secret@s1:26379/3?sentinel_master_name=my%20master&addr=s2:26380&sentinel_password=sp",
        )
        else {
            panic!("not a sentinel URL")
        };
        assert_eq!(master_name, "my master");
        assert_eq!(node.redis_settings().db(), 3);
        assert_eq!(node.redis_settings().password(), Some("secret"));
        assert!(matches!(node.addr(), ConnectionAddr::TcpTls { .. }));
        assert_eq!(address(&sentinels[1]), ("s2".into(), 26380));
        assert!(sentinels
            .iter()
            .all(|s| s.redis_settings().password() == Some("sp") && s.redis_settings().db() == 0));
    }

    #[test]
    fn a_fragment_after_the_query_applies_to_every_node() {
        let Ok(Target::Cluster(nodes)) =
            Target::parse("rediss+cluster://a:7000?addr=b:7001#insecure")
        else {
            panic!("not a cluster")
        };
        assert!(nodes
            .iter()
            .all(|node| matches!(node.addr(), ConnectionAddr::TcpTls { insecure: true, .. })));
        assert_eq!(address(&nodes[1]), ("b".into(), 7001));
    }

    #[test]
    fn plain_urls_are_one_server() {
        assert!(matches!(
            Target::parse("redis://localhost:6379/0"),
            Ok(Target::Single(_))
        ));
        assert!(Target::parse("redis+cluster://a:notaport?x").is_err());
    }
}
