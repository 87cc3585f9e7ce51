//! The connection an operation runs on: one server's (also a Sentinel group's master), or a
//! Redis Cluster's, which routes each command to the master of its key's slot and follows
//! MOVED and ASK redirects, failovers and resharding by itself.
//!
//! A cluster runs a pipeline only when all its commands go to one slot, and on a redirect it
//! sends the whole pipeline again. So a pipeline is split here by slot, and only pipelines of
//! commands that may safely run twice (reads, trims) are sent whole; writes go one by one,
//! in order per slot (`run_each`).

use futures_util::future::{join_all, try_join_all};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SlotAddr};
use redis::{Arg, Cmd, Pipeline, RedisFuture, RedisResult, Value};

#[derive(Clone)]
pub enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The key a command of ours acts on: the first key of a script, else the first argument.
fn command_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()??;
    let position = if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        2
    } else if name.eq_ignore_ascii_case(b"TIME")
        || name.eq_ignore_ascii_case(b"SCAN")
        || name.eq_ignore_ascii_case(b"WAIT")
    {
        return None;
    } else {
        0
    };
    args.nth(position)?
}

/// The commands' indexes grouped by the slot of their key, in order within each group; a
/// command without a key gets a group of its own.
fn by_slot<'a>(commands: impl Iterator<Item = &'a Cmd>) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Option<Route>, Vec<usize>)> = Vec::new();
    for (index, cmd) in commands.enumerate() {
        let route = command_key(cmd).map(|key| Route::with_key(key, SlotAddr::Master));
        match groups
            .iter_mut()
            .find(|(found, _)| route.is_some() && *found == route)
        {
            Some((_, members)) => members.push(index),
            None => groups.push((route, vec![index])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

impl Link {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Link::Cluster(_))
    }

    /// Runs `commands`, writes that must not run twice, and returns each one's reply (a
    /// refusal from Redis is a `Value::ServerError`). One server gets them in one pipeline; a
    /// cluster gets them one at a time per slot, slots side by side.
    pub async fn run_each(&mut self, commands: &[Cmd]) -> RedisResult<Vec<Value>> {
        match self {
            Link::Single(manager) => {
                let mut pipe = Pipeline::with_capacity(commands.len());
                pipe.ignore_errors();
                for cmd in commands {
                    pipe.add_command(cmd.clone());
                }
                manager.req_packed_commands(&pipe, 0, commands.len()).await
            }
            Link::Cluster(cluster) => {
                let groups = by_slot(commands.iter());
                let runs = groups.iter().map(|group| {
                    let mut cluster = cluster.clone();
                    async move {
                        let mut replies = Vec::with_capacity(group.len());
                        for &index in group {
                            replies.push(cluster.req_packed_command(&commands[index]).await?);
                        }
                        RedisResult::Ok(replies)
                    }
                });
                let replies = try_join_all(runs).await?;
                Ok(in_order(commands.len(), &groups, replies))
            }
        }
    }

    /// A cluster pipeline: one per slot, side by side; the commands may run twice.
    async fn cluster_pipeline(
        cluster: &ClusterConnection,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
        let groups = by_slot(commands.iter().copied());
        let runs = groups.iter().map(|group| {
            let mut cluster = cluster.clone();
            let mut part = Pipeline::with_capacity(group.len());
            part.ignore_errors();
            for &index in group {
                part.add_command(commands[index].clone());
            }
            async move { cluster.req_packed_commands(&part, 0, group.len()).await }
        });
        let replies = join_all(runs)
            .await
            .into_iter()
            .collect::<RedisResult<Vec<_>>>()?;
        let replies = in_order(commands.len(), &groups, replies);
        Ok(replies.into_iter().skip(offset).take(count).collect())
    }
}

/// The replies of the groups put back in the order of the commands.
fn in_order(count: usize, groups: &[Vec<usize>], replies: Vec<Vec<Value>>) -> Vec<Value> {
    let mut ordered = vec![Value::Nil; count];
    for (group, replies) in groups.iter().zip(replies) {
        for (&index, reply) in group.iter().zip(replies) {
            ordered[index] = reply;
        }
    }
    ordered
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(manager) => manager.req_packed_command(cmd),
            Link::Cluster(cluster) => cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(manager) => manager.req_packed_commands(pipeline, offset, count),
            Link::Cluster(cluster) => {
                Box::pin(Link::cluster_pipeline(cluster, pipeline, offset, count))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(manager) => manager.get_db(),
            Link::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::by_slot;

    #[test]
    fn commands_group_by_the_slot_of_their_key_in_order() {
        let mut commands = Vec::new();
        for key in ["{a}x", "b", "{a}y", "b"] {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg("sha").arg(2).arg(key).arg("other");
            commands.push(cmd);
        }
        commands.push(redis::cmd("TIME"));
        commands.push(redis::cmd("TIME"));
        let mut zrange = redis::cmd("ZRANGEBYSCORE");
        zrange.arg("{a}z").arg(0).arg("+inf");
        commands.push(zrange);
        assert_eq!(
            by_slot(commands.iter()),
            vec![vec![0, 2, 6], vec![1, 3], vec![4], vec![5]]
        );
    }
}
