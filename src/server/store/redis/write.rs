//! The write path: ops queued as pipelined commands and scripts, outcomes read back, retries
//! after a lost epoch or script cache, and the sweep.

use std::time::{SystemTime, UNIX_EPOCH};

use redis::{Connection, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};
use tracing::warn;

use super::scripts::{evalsha, Scripts};
use super::{
    establish_epoch, key, parse_epoch, unexpected, Failure, OpResult, EPOCH_KEY, GRACE, PREFIX,
    RETRIES, SEEN_KEY, SWEEP_KEY, SWEEP_PAGE, SWEEP_ROUNDS,
};
use crate::server::store::{Op, Outcome};
use crate::wire;

/// How an op's first reply becomes its outcome.
#[derive(Clone, Copy)]
enum Reply {
    Done,
    Linked,
    Removed,
    Fresh,
    Offset,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What an op is, for error messages.
pub(super) fn describe(op: &Op) -> String {
    match op {
        Op::Touch { id, .. } => format!("touch {id}"),
        Op::SetSession { id, .. } => format!("set the session of {id}"),
        Op::Link { first, second, .. } => format!("link {second} to {first}"),
        Op::Unlink { first, second } => format!("unlink {second} from {first}"),
        Op::UseNonce { first, .. } => format!("use a nonce of {first}"),
        Op::Revoke { first, second, .. } => format!("revoke {second}'s tickets from {first}"),
        Op::Append { to, .. } => format!("append to {to}"),
        Op::Ack { to, .. } => format!("ack for {to}"),
        Op::Sweep { .. } => "sweep".to_string(),
        Op::ExpireIdle { .. } => "expire idle terminals".to_string(),
        Op::Follow { first, second, .. } => format!("link {second} to {first} (follow)"),
    }
}

/// Queues `op`'s commands on `pipe`, the one deciding its outcome first. `now` is the wall
/// clock, for the TTLs of ops that carry no time of their own.
fn queue(
    pipe: &mut redis::Pipeline,
    scripts: &Scripts,
    epoch: u64,
    op: &Op,
    now: u64,
) -> Result<Reply, Failure> {
    let encode_err = |e: wire::WireError| Failure::Other(format!("cannot encode: {e}"));
    Ok(match op {
        Op::Touch { id, now } => {
            pipe.cmd("SET").arg(key(id, "known")).arg(now);
            pipe.cmd("ZADD")
                .arg(SEEN_KEY)
                .arg("GT")
                .arg(now)
                .arg(id.to_string());
            Reply::Done
        }
        Op::SetSession { id, session } => {
            match session {
                Some(s) => {
                    let bytes = wire::encode_payload(s).map_err(encode_err)?;
                    pipe.cmd("SET").arg(key(id, "session")).arg(bytes)
                }
                None => pipe.cmd("DEL").arg(key(id, "session")),
            };
            Reply::Done
        }
        Op::Link {
            first,
            second,
            until,
            since,
            unless_revoked,
        } => {
            // Two single-slot writes: first's followers and where the link began in first's
            // stream (with the revocation check, in one script), then second's following (if
            // the first refused, an entry there names no link: every read checks first's side).
            let ttl = until.saturating_sub(now).saturating_add(GRACE);
            let followers = key(first, "followers");
            let keys = [&followers, &key(first, "since"), &key(first, "revoked")];
            evalsha(pipe, &scripts.link, &keys.map(String::as_str))
                .arg(second.to_string())
                .arg(until)
                .arg(since)
                .arg(ttl)
                .arg(unless_revoked.map_or(-1, |at| i64::try_from(at).unwrap_or(i64::MAX)));
            let following = key(second, "following");
            pipe.cmd("ZADD")
                .arg(&following)
                .arg(until)
                .arg(first.to_string());
            // NX gives a new key its TTL, GT extends an existing one.
            pipe.cmd("EXPIRE").arg(&following).arg(ttl).arg("NX");
            pipe.cmd("EXPIRE").arg(&following).arg(ttl).arg("GT");
            for set in [&followers, &following] {
                pipe.cmd("ZADD")
                    .arg(SWEEP_KEY)
                    .arg("LT")
                    .arg(until)
                    .arg(set);
            }
            Reply::Linked
        }
        Op::Unlink { first, second } => {
            pipe.cmd("ZREM")
                .arg(key(first, "followers"))
                .arg(second.to_string());
            pipe.cmd("HDEL")
                .arg(key(first, "since"))
                .arg(second.to_string());
            pipe.cmd("ZREM")
                .arg(key(second, "following"))
                .arg(first.to_string());
            Reply::Removed
        }
        Op::Revoke {
            first,
            second,
            at,
            keep_until,
            capacity,
            now: at_now,
        } => {
            // The script ends the link on the first terminal's side and decides; the second's
            // side follows (two single-slot writes, as for an unlink).
            let ttl = keep_until.saturating_sub(now).saturating_add(GRACE);
            evalsha(
                pipe,
                &scripts.revoke,
                &[
                    &key(first, "revoked"),
                    &key(first, "revoked_until"),
                    &key(first, "followers"),
                ],
            )
            .arg(second.to_string())
            .arg(at)
            .arg(ttl)
            .arg(capacity)
            .arg(keep_until)
            .arg(at_now);
            pipe.cmd("HDEL")
                .arg(key(first, "since"))
                .arg(second.to_string());
            pipe.cmd("ZREM")
                .arg(key(second, "following"))
                .arg(first.to_string());
            Reply::Removed
        }
        Op::UseNonce {
            first,
            second,
            issued_at,
            nonce,
            not_after,
            now,
            capacity,
        } => {
            let set = key(first, "nonces");
            let ttl = not_after.saturating_sub(*now).saturating_add(GRACE);
            evalsha(pipe, &scripts.use_nonce, &[&set, &key(first, "revoked")])
                .arg(&nonce[..])
                .arg(not_after)
                .arg(now)
                .arg(capacity)
                .arg(ttl)
                .arg(second.to_string())
                .arg(issued_at);
            pipe.cmd("ZADD")
                .arg(SWEEP_KEY)
                .arg("LT")
                .arg(not_after)
                .arg(&set);
            Reply::Fresh
        }
        Op::Append { to, push, now } => {
            let stored = push.stored(0, *now);
            // The offset is the member's first 8 bytes; the one inside the item is set on read.
            let payload = wire::encode_payload(&stored).map_err(encode_err)?;
            let ttl = stored.expires_at.saturating_sub(*now).saturating_add(GRACE);
            let log = key(to, "log");
            let keys: [&str; 5] = [
                EPOCH_KEY,
                &key(to, "cursor"),
                &log,
                &key(to, "expiry"),
                &key(to, "collapse"),
            ];
            let call = evalsha(pipe, &scripts.append, &keys)
                .arg(epoch)
                .arg(stored.expires_at)
                .arg(ttl)
                .arg(payload);
            if let Some(collapse) = &stored.collapse_key {
                call.arg(collapse);
            }
            pipe.cmd("ZADD")
                .arg(SWEEP_KEY)
                .arg("LT")
                .arg(stored.expires_at)
                .arg(&log);
            Reply::Offset
        }
        Op::Ack { to, next } => {
            let keys = [&key(to, "cursor"), &key(to, "log"), &key(to, "expiry")];
            evalsha(pipe, &scripts.ack, &keys.map(String::as_str)).arg(next);
            Reply::Done
        }
        Op::Sweep { .. } | Op::Follow { .. } | Op::ExpireIdle { .. } => {
            return Err(Failure::Other(format!(
                "{} cannot be pipelined (this is a bug)",
                describe(op)
            )))
        }
    })
}

/// What became of one op in one attempt.
enum Attempt {
    Done(Outcome),
    /// Not applied: Redis forgot the scripts, or the epoch changed. Retry after fixing that.
    Retry,
}

fn outcome(reply: Reply, value: &Value) -> Result<Attempt, Failure> {
    let int = match value {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    Ok(Attempt::Done(match (reply, int) {
        (Reply::Done, _) => Outcome::Done,
        (Reply::Removed, Some(-1)) => Outcome::Full,
        (Reply::Removed, Some(n)) => Outcome::Removed(n > 0),
        (Reply::Fresh, Some(1)) => Outcome::Fresh(Some(true)),
        (Reply::Fresh, Some(0)) => Outcome::Fresh(Some(false)),
        (Reply::Fresh, Some(-1)) => Outcome::Fresh(None),
        (Reply::Fresh, Some(-2)) => Outcome::Revoked,
        (Reply::Linked, Some(1)) => Outcome::Done,
        (Reply::Linked, Some(-2)) => Outcome::Revoked,
        (Reply::Offset, Some(-1)) => return Ok(Attempt::Retry),
        (Reply::Offset, Some(n)) if n >= 0 => Outcome::Offset(n as u64),
        _ => return Err(unexpected("the operation", value)),
    }))
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Applies a run of ops without sweeps as one pipeline (retrying those Redis could not apply),
/// storing results in `out` and the epoch Redis holds afterwards in `epoch`. An op that Redis
/// refuses (an error reply to one of its commands) fails alone, in `out`; the others of the
/// pipeline are applied all the same. `Err`: the run as such failed (connection, protocol).
pub(super) fn apply_run(
    conn: &mut Connection,
    scripts: &Scripts,
    shown: &str,
    epoch: &mut u64,
    ops: &[Op],
    out: &mut [Option<OpResult>],
) -> Result<(), Failure> {
    let failed = |op: &Op, e: &dyn std::fmt::Display| {
        Some(Err(format!("redis {shown}: {}: {e}", describe(op))))
    };
    let now = unix_now();
    let mut todo: Vec<usize> = (0..ops.len()).collect();
    // The first round always goes out, even for no ops: its GET of the epoch is how an empty
    // batch checks that Redis still holds the logs.
    for round in 0..=RETRIES {
        if todo.is_empty() && round > 0 {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut plan = Vec::with_capacity(todo.len());
        for &i in &todo {
            let start = pipe.len();
            // An op that cannot be queued (it does not encode) adds no command: it fails alone.
            match queue(&mut pipe, scripts, *epoch, &ops[i], now) {
                Ok(reply) => plan.push((i, start..pipe.len(), reply)),
                Err(e) => out[i] = failed(&ops[i], &e),
            }
        }
        // The epoch as of the end of the batch: a loss is noticed on any write.
        pipe.cmd("GET").arg(EPOCH_KEY);
        let replies: Vec<RedisResult<Value>> = pipe.ignore_errors().query(conn)?;
        if replies.len() != pipe.len() {
            return Err(Failure::Other(format!(
                "{} replies to {} commands",
                replies.len(),
                pipe.len()
            )));
        }
        // Ops to retry (appends refused for a stale epoch, scripts Redis had forgotten) run
        // after the rest of the batch. A caller puts its appends last in its write (the server's
        // `store_pushes`), so this reorders them only against other callers' ops, whose order
        // in a group commit is arbitrary anyway.
        let mut retry = Vec::new();
        let mut reload = false;
        let mut renew = false;
        for (i, range, reply) in plan {
            // An op's first command decides its outcome; the others must merely succeed.
            let (first, rest) = match replies[range].split_first() {
                Some(split) => split,
                None => {
                    return Err(Failure::Other(format!(
                        "{} sent nothing",
                        describe(&ops[i])
                    )))
                }
            };
            if let Some(Err(e)) = rest.iter().find(|r| r.is_err()) {
                out[i] = failed(&ops[i], e);
                continue;
            }
            match first {
                Ok(value) => match outcome(reply, value)? {
                    Attempt::Done(o) => out[i] = Some(Ok(o)),
                    Attempt::Retry => {
                        renew = true;
                        retry.push(i);
                    }
                },
                Err(e) if is_noscript(e) => {
                    reload = true;
                    retry.push(i);
                }
                Err(e) => out[i] = failed(&ops[i], e),
            }
        }
        let current = match replies.last() {
            Some(Ok(Value::BulkString(bytes))) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Some(Ok(Value::Nil)) => None,
            Some(Ok(other)) => return Err(unexpected("GET epoch", other)),
            Some(Err(e)) => return Err(Failure::Other(format!("GET {EPOCH_KEY}: {e}"))),
            None => return Err(Failure::Other("no reply to GET epoch".into())),
        };
        if renew || current.as_deref().map(parse_epoch).transpose()? != Some(*epoch) {
            let new = establish_epoch(conn)?;
            if new != *epoch {
                warn!(
                    "redis {shown}: the push logs' epoch changed from {} to {new}: Redis lost \
                     its data (restart without persistence, FLUSHALL?) or another node saw that \
                     first; terminals resume from the current state",
                    *epoch
                );
                *epoch = new;
            }
        }
        if reload {
            scripts.load(conn)?;
        }
        todo = retry;
    }
    if todo.is_empty() {
        Ok(())
    } else {
        Err(Failure::Other(format!(
            "{} still not applied after {RETRIES} retries (the epoch or the scripts keep \
             vanishing)",
            describe(&ops[todo[0]])
        )))
    }
}

/// Sweeps the keys registered in `handoff:v1:sweep` with a deadline at or before `now`.
pub(super) fn sweep(conn: &mut Connection, scripts: &Scripts, now: u64) -> Result<(), Failure> {
    for _ in 0..SWEEP_ROUNDS {
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(SWEEP_KEY)
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_PAGE)
            .query(conn)?;
        if due.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut swept = Vec::new();
        let mut reload = false;
        let mut update = redis::pipe();
        for name in &due {
            let base = name
                .strip_prefix(PREFIX)
                .and_then(|_| name.rsplit_once(':'));
            match base {
                Some((base, "log")) => {
                    let keys =
                        ["cursor", "log", "expiry", "collapse"].map(|k| format!("{base}:{k}"));
                    evalsha(
                        &mut pipe,
                        &scripts.sweep_log,
                        &keys.each_ref().map(String::as_str),
                    )
                    .arg(now);
                    swept.push(name);
                }
                Some((base, "followers")) => {
                    let since = format!("{base}:since");
                    evalsha(
                        &mut pipe,
                        &scripts.sweep_deadlines,
                        &[name.as_str(), &since],
                    )
                    .arg(now);
                    swept.push(name);
                }
                Some((_, "following" | "nonces")) => {
                    evalsha(&mut pipe, &scripts.sweep_deadlines, &[name.as_str()]).arg(now);
                    swept.push(name);
                }
                // Not a key this layout registers: forget it.
                _ => {
                    update.cmd("ZREM").arg(SWEEP_KEY).arg(name).ignore();
                }
            }
        }
        let replies: Vec<RedisResult<Value>> = if pipe.is_empty() {
            Vec::new()
        } else {
            pipe.ignore_errors().query(conn)?
        };
        for (name, reply) in swept.into_iter().zip(replies) {
            match reply {
                Ok(Value::Int(-1)) => {
                    update.cmd("ZREM").arg(SWEEP_KEY).arg(name).ignore();
                }
                // The key's next deadline. A writer may have registered an earlier one since the
                // script ran; then that garbage waits until this one (reads skip it meanwhile).
                Ok(Value::Int(next)) => {
                    update
                        .cmd("ZADD")
                        .arg(SWEEP_KEY)
                        .arg("XX")
                        .arg(next)
                        .arg(name)
                        .ignore();
                }
                Ok(other) => return Err(unexpected("a sweep script", &other)),
                // Left registered: the next round (or sweep) visits it again.
                Err(e) if is_noscript(&e) => reload = true,
                Err(e) => return Err(Failure::Other(format!("sweep {name}: {e}"))),
            }
        }
        if !update.is_empty() {
            update.exec(conn)?;
        }
        if reload {
            scripts.load(conn)?;
        }
    }
    Ok(())
}

/// Forgets terminals last seen before `seen_before` without a link alive at `now` (at most
/// [`SWEEP_ROUNDS`] pages of [`SWEEP_PAGE`] per call; the rest waits for the next). Returns
/// how many were forgotten.
pub(super) fn expire_idle(
    conn: &mut Connection,
    scripts: &Scripts,
    now: u64,
    seen_before: u64,
) -> Result<u64, Failure> {
    let mut expired = 0;
    for _ in 0..SWEEP_ROUNDS {
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(SEEN_KEY)
            .arg("-inf")
            .arg(format!("({seen_before}"))
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_PAGE)
            .query(conn)?;
        if due.is_empty() {
            break;
        }
        let mut pipe = redis::pipe();
        for name in &due {
            let Ok(id) = name.parse::<crate::identity::TerminalId>() else {
                // Not an ID this layout writes: forget it.
                pipe.cmd("ZREM").arg(SEEN_KEY).arg(name);
                continue;
            };
            let keys = [
                SEEN_KEY.to_string(),
                key(&id, "known"),
                key(&id, "session"),
                key(&id, "followers"),
                key(&id, "following"),
            ];
            evalsha(
                &mut pipe,
                &scripts.expire_idle,
                &keys.each_ref().map(String::as_str),
            )
            .arg(name)
            .arg(seen_before)
            .arg(now);
        }
        let replies: Vec<RedisResult<Value>> = pipe.ignore_errors().query(conn)?;
        for reply in replies {
            match reply {
                Ok(Value::Int(n)) => expired += n.max(0) as u64,
                Ok(_) => {}
                Err(e) if is_noscript(&e) => {
                    scripts.load(conn)?;
                    break;
                }
                Err(e) => return Err(Failure::Other(format!("expire idle terminals: {e}"))),
            }
        }
    }
    Ok(expired)
}
