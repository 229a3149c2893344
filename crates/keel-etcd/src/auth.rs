//! etcd's Auth service (users, roles, key-range permissions, tokens) and
//! who each call of the other services runs as.
//!
//! The users and roles are replicated state of the KV service
//! (`keel_kv::AuthStore`): every change is a log entry. Once auth is in
//! use, every read and write goes to the service with its caller
//! (`Command::As`, `Query::As`) and the service checks it against the
//! state it applies to or answers from; while auth is on it refuses the
//! etcd API's requests that come without one. This member's copy of the
//! state (`AuthShared`) serves for a first look, for tokens, and for the
//! calls the service does not see (admin calls, which look after a
//! linearizable read). This module adds what needs a secret or a clock:
//!
//! - **Passwords** are hashed here, by the member that takes the request,
//!   before they go into the log (PBKDF2-HMAC-SHA256, a random salt per
//!   password), as etcd hashes them with bcrypt. Only the hash is
//!   replicated; `Authenticate` checks a password against it.
//! - **Tokens** are signed, not stored: `user.generation.expiry.mac`, an
//!   HMAC-SHA256 under the secret `AuthEnable` put in the log, so any
//!   member checks any member's token with no log entry per login. A token
//!   lives `TOKEN_TTL` (etcd's `--auth-token-ttl` default), by the checking
//!   member's wall clock. A changed password, a deleted user, or auth
//!   turned off and on again makes older tokens invalid (the service
//!   checks the generation too); a changed role takes effect at once,
//!   since permissions are looked up on every call. An invalid or expired
//!   token is etcd's "invalid auth token" (Unauthenticated), on which etcd
//!   clients log in again.
//!
//! Calls carry the token in the gRPC metadata `token` (etcd's clients) or
//! `authorization` (its JSON gateway's header). While auth is off nothing
//! is checked and tokens are ignored.

use crate::{kv_status, unexpected, Api};
use bytes::Bytes;
use keel_etcd_proto::authpb;
use keel_etcd_proto::etcdserverpb::auth_client::AuthClient;
use keel_etcd_proto::etcdserverpb::auth_server::Auth;
use keel_etcd_proto::etcdserverpb::*;
use keel_kv::{
    Access, AuthCommand, AuthStore, Command, KvError, PermKind, Permission, Query,
    Response as KvResponse,
};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hmac, pbkdf2};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

/// How long a token is good for (etcd's `--auth-token-ttl` default).
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// How far apart the members' clocks may be for a token issued by one to
/// be taken by another at once.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// PBKDF2 rounds per password check: tens of milliseconds of one core,
/// about what etcd's bcrypt cost of 10 takes.
const PBKDF2_ROUNDS: u32 = 100_000;
/// How a stored hash starts: the scheme, then `$rounds$salt$hash` in hex.
const HASH_SCHEME: &str = "pbkdf2-sha256";
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;

/// The metadata keys a token may come in: etcd's clients send `token`, its
/// JSON gateway's clients the `Authorization` header.
const TOKEN_KEYS: [&str; 2] = ["token", "authorization"];

/// Who a call runs as: the user its token names (None: it carried no
/// token, or auth is off here) with the generation the token names, and
/// the token itself, kept even while auth looks off here (a member that
/// is behind): it is checked again once this member has caught up
/// (`Api::check_admin_now`) and passed on with the calls it forwards.
#[derive(Clone, Default)]
pub struct Who {
    user: Option<String>,
    generation: u64,
    token: Option<String>,
}

/// (Shown without its token.)
impl std::fmt::Debug for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Who")
            .field("user", &self.user)
            .field("generation", &self.generation)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// Marks a request this member makes for a caller (the Lock and Election
/// recipes' requests): it runs as that caller. Only code in this process
/// can put it in a request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct Internal(Who);

/// `msg` as a request this member makes for `who` (`Internal`).
pub(crate) fn internal<T>(msg: T, who: &Who) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(Internal(who.clone()));
    r
}

impl Who {
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Puts the caller's token on `r`, a request passed on to another
    /// member, which checks it again.
    pub fn pass_on<T>(&self, r: &mut Request<T>) {
        if let Some(value) = self
            .token
            .as_deref()
            .and_then(|t| MetadataValue::try_from(t).ok())
        {
            r.metadata_mut().insert(TOKEN_KEYS[0], value);
        }
    }
}

/// The token in a call's metadata, if any.
pub fn token_in(md: &MetadataMap) -> Option<String> {
    TOKEN_KEYS
        .iter()
        .find_map(|k| md.get(*k))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

fn token_key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

/// A token for `user`, good until `now` (Unix seconds) + `TOKEN_TTL`, or
/// None if there is no such user or no secret yet.
pub fn issue_token(view: &AuthStore, user: &str, now: u64) -> Option<String> {
    let u = view.user(user)?;
    if view.secret().is_empty() {
        return None;
    }
    let expiry = now.saturating_add(TOKEN_TTL.as_secs());
    let body = format!("{}.{}.{expiry}", hex(user.as_bytes()), u.generation);
    let tag = hmac::sign(&token_key(view.secret()), body.as_bytes());
    Some(format!("{body}.{}", hex(tag.as_ref())))
}

/// The user a token names and the user's generation, if it is one of
/// ours, unexpired at `now`, and names a user that still exists with the
/// password it was issued under.
pub fn verify_token(view: &AuthStore, token: &str, now: u64) -> Result<(String, u64), KvError> {
    let invalid = || KvError::InvalidAuthToken;
    if view.secret().is_empty() {
        return Err(invalid());
    }
    let (body, mac) = token.rsplit_once('.').ok_or_else(invalid)?;
    let mac = unhex(mac).ok_or_else(invalid)?;
    hmac::verify(&token_key(view.secret()), body.as_bytes(), &mac).map_err(|_| invalid())?;
    let mut parts = body.split('.');
    let (Some(user), Some(generation), Some(expiry), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let user = unhex(user)
        .and_then(|u| String::from_utf8(u).ok())
        .ok_or_else(invalid)?;
    let generation: u64 = generation.parse().map_err(|_| invalid())?;
    let expiry: u64 = expiry.parse().map_err(|_| invalid())?;
    // (An expiry further off than one lifetime, give or take the members'
    // clock differences, is none of ours: a member whose clock ran far
    // ahead made it.)
    let furthest = now.saturating_add(TOKEN_TTL.as_secs() + CLOCK_SKEW.as_secs());
    let live = now < expiry && expiry <= furthest;
    match view.user(&user) {
        Some(u) if u.generation == generation && live => Ok((user, generation)),
        _ => Err(invalid()),
    }
}

fn rounds() -> NonZeroU32 {
    NonZeroU32::new(PBKDF2_ROUNDS).unwrap_or(NonZeroU32::MIN)
}

/// `password` hashed for the log: `pbkdf2-sha256$rounds$salt$hash`.
pub fn hash_password(password: &str) -> Result<Bytes, Status> {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| Status::internal("no randomness for a password's salt"))?;
    let mut hash = [0u8; HASH_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        rounds(),
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    Ok(Bytes::from(format!(
        "{HASH_SCHEME}${PBKDF2_ROUNDS}${}${}",
        hex(&salt),
        hex(&hash)
    )))
}

/// Does `password` match the `stored` hash?
pub fn password_matches(stored: &[u8], password: &str) -> bool {
    let Ok(stored) = std::str::from_utf8(stored) else {
        return false;
    };
    let mut parts = stored.split('$');
    let (Some(HASH_SCHEME), Some(rounds), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Some(rounds), Some(salt), Some(hash)) = (
        rounds.parse().ok().and_then(NonZeroU32::new),
        unhex(salt),
        unhex(hash),
    ) else {
        return false;
    };
    pbkdf2::verify(
        pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        &salt,
        password.as_bytes(),
        &hash,
    )
    .is_ok()
}

/// A hash no password matches, checked in place of a missing one.
fn dummy_hash() -> &'static [u8] {
    static DUMMY: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = "00".repeat(SALT_LEN);
        let hash = "00".repeat(HASH_LEN);
        Bytes::from(format!("{HASH_SCHEME}${PBKDF2_ROUNDS}${salt}${hash}"))
    })
}

/// How long a member waits for another's answer to `AuthStatus`.
const MEMBER_ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a password hash or check off the network threads (each takes
/// tens of milliseconds of CPU).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("password hashing failed: {e}")))
}

impl Api {
    /// Who call `r` runs as: while auth is on, the user its token names
    /// (an invalid token is refused); a request this member makes for a
    /// caller runs as that caller (`internal`); else nobody.
    pub async fn who<T>(&self, r: &Request<T>) -> Result<Who, Status> {
        if let Some(Internal(who)) = r.extensions().get::<Internal>() {
            return Ok(who.clone());
        }
        self.who_in(r.metadata()).await
    }

    /// `who` for a call with metadata `md` (also the gateway's streams).
    /// A token this member cannot take while auth is in use (it looks off
    /// here, or the token does not verify) may be one it is too far
    /// behind for: auth turned on, or off and on with a new secret, where
    /// the client got its token. Then it catches up first (a linearizable
    /// read) and looks again, as etcd reads who the caller is only after
    /// its read barrier. (A client that sends a token where auth is off,
    /// such as one that kept its token after auth was turned off, costs
    /// that read on each call; etcd's clients send none where auth was
    /// never on.)
    pub async fn who_in(&self, md: &MetadataMap) -> Result<Who, Status> {
        let token = token_in(md);
        if token.is_none() {
            return Ok(Who::default());
        }
        let auth = &self.config.auth;
        if auth.enabled() {
            if let Ok(who) = self.verified(token.clone()) {
                return Ok(who);
            }
        }
        self.read(&Query::Status, false).await?;
        self.refreshed(&Who {
            token,
            ..Who::default()
        })
    }

    /// `token` checked against this member's auth state.
    fn verified(&self, token: Option<String>) -> Result<Who, Status> {
        let Some(token) = token else {
            return Ok(Who::default());
        };
        let view = self.config.auth.current();
        let (user, generation) = verify_token(&view, &token, unix_now()).map_err(kv_status)?;
        Ok(Who {
            user: Some(user),
            generation,
            token: Some(token),
        })
    }

    /// Runs `check` for `who` against this member's auth state while auth
    /// is on: the user must still have the generation its token names. (A
    /// member that is behind may not know auth is on yet: reads and writes
    /// are checked again by the service, admin calls look after a
    /// linearizable read, `check_admin_now`.)
    pub fn check(
        &self,
        who: &Who,
        check: impl FnOnce(&AuthStore, Option<&str>) -> Result<(), KvError>,
    ) -> Result<(), Status> {
        if !self.config.auth.enabled() {
            return Ok(());
        }
        let view = self.config.auth.current();
        view.check_caller(who.user(), who.generation)
            .and_then(|()| check(&view, who.user()))
            .map_err(kv_status)
    }

    /// That `who` is an admin, checked once this member has applied
    /// everything committed before the call (a linearizable read first),
    /// with its token checked again then: a member that was behind might
    /// not have known that auth is on, or that a role was revoked. For
    /// calls acted on here and now (membership changes, leader moves,
    /// alarms), which are rare. Where no leader is known the read cannot
    /// be made: while auth has never been used this member's state is
    /// taken as it is (such calls worked without a leader before auth),
    /// else the call is refused. The caller as checked, for passing the call on.
    pub async fn check_admin_now(&self, who: &Who) -> Result<Who, Status> {
        match self.read(&Query::Status, false).await {
            Ok(_) => {}
            // (Only where no leader is known: a leader still applying a
            // long log may not know yet that auth is in use, and its read
            // may time out.)
            Err(e)
                if e.code() == tonic::Code::Unavailable
                    && self.node.status().leader.is_none()
                    && !self.config.auth.in_use() => {}
            Err(e) => return Err(e),
        }
        let who = self.refreshed(who)?;
        self.check(&who, AuthStore::check_admin)?;
        Ok(who)
    }

    /// `who` with its token checked again against this member's auth
    /// state as it is now (after a linearizable read brought it up to
    /// date), where auth is on.
    pub fn refreshed(&self, who: &Who) -> Result<Who, Status> {
        if self.config.auth.enabled() {
            self.verified(who.token.clone())
        } else {
            Ok(who.clone())
        }
    }

    /// Runs `q` for `who`: while auth is in use, as `Query::As`, which the
    /// service checks against the state it answers from (so a read that
    /// waited for the leader is checked after it did).
    pub async fn read_as(
        &self,
        who: &Who,
        q: Query,
        serializable: bool,
    ) -> Result<KvResponse, Status> {
        let q = match self.wrap(who) {
            Some((user, generation)) => Query::As {
                user,
                generation,
                query: Box::new(q),
            },
            None => q,
        };
        self.read(&q, serializable).await
    }

    /// Runs `cmd` through the log for `who`: while auth is in use, as
    /// `Command::As`, which the service checks when it applies it, so a
    /// write cannot slip past a revocation or auth being turned on. (A
    /// member that does not know yet that auth is in use sends it plain;
    /// the service refuses the etcd API's plain writes while auth is on,
    /// `Command::needs_a_caller`.)
    pub async fn write_as(&self, who: &Who, cmd: Command) -> Result<KvResponse, Status> {
        // Refused here already if this member's copy of the auth state
        // refuses it, so a refused write costs no log entry. (Its lease
        // checks need the service's leases: with none here they pass, and
        // the service decides.)
        self.check(who, |v, user| {
            v.check_command(user, &cmd, &keel_kv::Leases::default())
        })?;
        let auth_change = matches!(cmd, Command::Auth(_));
        let cmd = match self.wrap(who) {
            Some((user, generation)) => Command::As {
                user,
                generation,
                command: Box::new(cmd),
            },
            // Auth changes are always sent with their caller.
            None if auth_change => Command::As {
                user: who.user.clone(),
                generation: who.generation,
                command: Box::new(cmd),
            },
            None => cmd,
        };
        self.write(&cmd).await
    }

    /// The user and generation to send with `who`'s requests, once auth is
    /// in use (a user or role was ever added). Until then requests go as
    /// they did before auth, which binaries from before it apply too (a
    /// cluster being upgraded node by node).
    fn wrap(&self, who: &Who) -> Option<(Option<String>, u64)> {
        let auth = &self.config.auth;
        (auth.in_use() || auth.enabled()).then(|| (who.user.clone(), who.generation))
    }
}

/// The range of keys starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(&[0])
}

/// Checks that `who` may read and write every key starting with `name`
/// (the Lock and Election recipes' keys).
pub fn check_recipe(api: &Api, who: &Who, name: &[u8]) -> Result<(), Status> {
    let end = prefix_end(name);
    api.check(who, |v, user| {
        v.check_range(user, Access::Read, name, &end)?;
        v.check_range(user, Access::Write, name, &end)
    })
}

pub struct AuthApi(pub Arc<Api>);

impl AuthApi {
    /// Brings this member's copy of the auth state up to the cluster's
    /// (a linearizable read), then returns it with the store revision for
    /// the header.
    async fn current(&self) -> Result<(Arc<AuthStore>, i64), Status> {
        let revision = match self.0.read(&Query::Status, false).await? {
            KvResponse::Status { revision, .. } => revision as i64,
            other => return Err(unexpected(&other)),
        };
        Ok((self.0.config.auth.current(), revision))
    }

    /// Applies an auth change as `who`; the response header.
    async fn change(&self, who: &Who, c: AuthCommand) -> Result<Option<ResponseHeader>, Status> {
        if !self.0.config.auth.in_use() {
            self.every_member_serves_auth().await?;
        }
        match self.0.write_as(who, Command::Auth(c)).await? {
            KvResponse::Auth { revision } => Ok(self.0.header(revision as i64)),
            other => Err(unexpected(&other)),
        }
    }

    /// Before auth is first used: every other member runs a Keel that
    /// serves Auth. One that does not (a cluster being upgraded node by
    /// node) would skip the auth entries, and the requests sent as a user
    /// from then on, and its state would part from the others'.
    async fn every_member_serves_auth(&self) -> Result<(), Status> {
        let st = self.0.node.status();
        for m in st.voters.iter().chain(&st.learners).copied() {
            if m == st.id {
                continue;
            }
            let refuse = |why: String| {
                Status::failed_precondition(format!(
                    "etcdserver: auth (users, roles, auth enable) needs every member on a Keel \
                     version that serves it, and {why}"
                ))
            };
            let has_address = self
                .0
                .config
                .members
                .iter()
                .any(|i| i.id == m && !i.client_urls.is_empty());
            if !has_address {
                return Err(refuse(format!(
                    "member {m:x} cannot be asked: this node's configuration gives it no etcd \
                     address (etcd_addr in its [[peers]] entry)"
                )));
            }
            let who = format!("member {m:x}");
            let ask = async {
                let channel = self.0.member_channel(m, &who).await?;
                AuthClient::new(channel)
                    .auth_status(AuthStatusRequest {})
                    .await
                    .inspect_err(|e| self.0.forget_channel(m, e))
            };
            match tokio::time::timeout(MEMBER_ASK_TIMEOUT, ask).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.code() == tonic::Code::Unimplemented => {
                    return Err(refuse(format!("{who} does not: upgrade it first")))
                }
                Ok(Err(e)) => {
                    return Err(refuse(format!(
                        "{who} could not be asked ({}): bring it back first",
                        e.message()
                    )))
                }
                Err(_) => {
                    return Err(refuse(format!(
                        "{who} did not answer within 2 s: bring it back first"
                    )))
                }
            }
        }
        Ok(())
    }

    /// `who` is an admin, while auth is on (a first look: the service
    /// checks changes again when it applies them, and the reads below
    /// look after a linearizable read).
    fn admin(&self, who: &Who) -> Result<(), Status> {
        self.0.check(who, AuthStore::check_admin)
    }
}

/// A password an etcd 3.5+ client hashed itself (bcrypt) is not taken.
fn no_hashed_password(hashed: &str) -> Result<(), Status> {
    if hashed.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "etcdserver: Keel takes passwords, not hashes made by the client \
             (send the password itself, over TLS)",
        ))
    }
}

#[tonic::async_trait]
impl Auth for AuthApi {
    async fn auth_enable(
        &self,
        r: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let who = self.0.who(&r).await?;
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| Status::internal("no randomness for the token secret"))?;
        let header = self
            .change(
                &who,
                AuthCommand::Enable {
                    secret: Bytes::copy_from_slice(&secret),
                },
            )
            .await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        r: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let who = self.0.who(&r).await?;
        let header = self.change(&who, AuthCommand::Disable).await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(
        &self,
        _r: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        let (view, revision) = self.current().await?;
        Ok(Response::new(AuthStatusResponse {
            header: self.0.header(revision),
            enabled: view.enabled(),
            auth_revision: view.revision(),
        }))
    }

    async fn authenticate(
        &self,
        r: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let AuthenticateRequest { name, password } = r.into_inner();
        let (view, revision) = self.current().await?;
        if !view.enabled() {
            return Err(kv_status(KvError::AuthNotEnabled));
        }
        let stored = view.user(&name).and_then(|u| u.password.clone());
        // A user that does not exist (or has no password) costs a check
        // too, so the time taken does not tell which users exist.
        let matches = blocking(move || match stored {
            Some(stored) => password_matches(&stored, &password),
            None => {
                let _ = password_matches(dummy_hash(), &password);
                false
            }
        })
        .await?;
        let token = if matches {
            issue_token(&view, &name, unix_now())
        } else {
            None
        };
        let token = token.ok_or_else(|| kv_status(KvError::AuthFailed))?;
        Ok(Response::new(AuthenticateResponse {
            header: self.0.header(revision),
            token,
        }))
    }

    async fn user_add(
        &self,
        r: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let who = self.0.who(&r).await?;
        let r = r.into_inner();
        self.admin(&who)?;
        no_hashed_password(&r.hashed_password)?;
        if r.name.is_empty() {
            return Err(kv_status(KvError::UserEmpty));
        }
        let no_password = r.options.is_some_and(|o| o.no_password);
        let password = if no_password {
            None
        } else {
            let p = r.password;
            Some(blocking(move || hash_password(&p)).await??)
        };
        let header = self
            .change(
                &who,
                AuthCommand::UserAdd {
                    name: r.name,
                    password,
                },
            )
            .await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        r: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let who = self.0.who(&r).await?;
        let name = r.into_inner().name;
        let (view, revision) = self.current().await?;
        let who = self.0.refreshed(&who)?;
        // As etcd: an admin, or a user asking about itself.
        if who.user() != Some(name.as_str()) {
            self.admin(&who)?;
        }
        let user = view
            .user(&name)
            .ok_or_else(|| kv_status(KvError::UserNotFound))?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.0.header(revision),
            roles: user.roles.iter().cloned().collect(),
        }))
    }

    async fn user_list(
        &self,
        r: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let who = self.0.who(&r).await?;
        let (view, revision) = self.current().await?;
        let who = self.0.refreshed(&who)?;
        self.admin(&who)?;
        Ok(Response::new(AuthUserListResponse {
            header: self.0.header(revision),
            users: view.user_names(),
        }))
    }

    async fn user_delete(
        &self,
        r: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let who = self.0.who(&r).await?;
        let name = r.into_inner().name;
        let header = self.change(&who, AuthCommand::UserDelete { name }).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        r: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let who = self.0.who(&r).await?;
        let r = r.into_inner();
        self.admin(&who)?;
        no_hashed_password(&r.hashed_password)?;
        let p = r.password;
        let password = blocking(move || hash_password(&p)).await??;
        let header = self
            .change(
                &who,
                AuthCommand::UserChangePassword {
                    name: r.name,
                    password,
                },
            )
            .await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        r: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let who = self.0.who(&r).await?;
        let AuthUserGrantRoleRequest { user, role } = r.into_inner();
        let header = self
            .change(&who, AuthCommand::UserGrantRole { user, role })
            .await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        r: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let who = self.0.who(&r).await?;
        let AuthUserRevokeRoleRequest { name, role } = r.into_inner();
        let header = self
            .change(&who, AuthCommand::UserRevokeRole { name, role })
            .await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        r: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let who = self.0.who(&r).await?;
        let name = r.into_inner().name;
        let header = self.change(&who, AuthCommand::RoleAdd { name }).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        r: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let who = self.0.who(&r).await?;
        let name = r.into_inner().role;
        let (view, revision) = self.current().await?;
        let who = self.0.refreshed(&who)?;
        // As etcd: an admin, or a user holding the role.
        let holds = who
            .user()
            .and_then(|u| view.user(u))
            .is_some_and(|u| u.roles.contains(&name));
        if !holds {
            self.admin(&who)?;
        }
        let role = view
            .role(&name)
            .ok_or_else(|| kv_status(KvError::RoleNotFound))?;
        let perm = role
            .perms
            .iter()
            .map(|p| authpb::Permission {
                perm_type: p.kind as i32,
                key: p.key.clone(),
                range_end: p.range_end.clone(),
            })
            .collect();
        Ok(Response::new(AuthRoleGetResponse {
            header: self.0.header(revision),
            perm,
        }))
    }

    async fn role_list(
        &self,
        r: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let who = self.0.who(&r).await?;
        let (view, revision) = self.current().await?;
        let who = self.0.refreshed(&who)?;
        self.admin(&who)?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.0.header(revision),
            roles: view.role_names(),
        }))
    }

    async fn role_delete(
        &self,
        r: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let who = self.0.who(&r).await?;
        let name = r.into_inner().role;
        let header = self.change(&who, AuthCommand::RoleDelete { name }).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        r: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let who = self.0.who(&r).await?;
        let AuthRoleGrantPermissionRequest { name, perm } = r.into_inner();
        let perm =
            perm.ok_or_else(|| Status::invalid_argument("etcdserver: permission not given"))?;
        let kind = PermKind::from_i32(perm.perm_type).ok_or_else(|| {
            Status::invalid_argument(format!(
                "etcdserver: unknown permission type {}, expected READ (0), WRITE (1) or READWRITE (2)",
                perm.perm_type
            ))
        })?;
        let perm = Permission {
            kind,
            key: perm.key,
            range_end: perm.range_end,
        };
        let header = self
            .change(&who, AuthCommand::RoleGrantPermission { role: name, perm })
            .await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        r: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let who = self.0.who(&r).await?;
        let AuthRoleRevokePermissionRequest {
            role,
            key,
            range_end,
        } = r.into_inner();
        let header = self
            .change(
                &who,
                AuthCommand::RoleRevokePermission {
                    role,
                    key,
                    range_end,
                },
            )
            .await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_match_only_their_own_hash() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with(b"pbkdf2-sha256$100000$"));
        assert!(password_matches(&h, "s3cret"));
        assert!(!password_matches(&h, "s3cret "));
        assert!(!password_matches(&h, ""));
        // Two hashes of one password differ (the salt).
        assert_ne!(h, hash_password("s3cret").unwrap());
        // Damaged hashes match nothing and do not panic.
        for bad in [
            &b""[..],
            b"pbkdf2-sha256$0$00$00",
            b"x$1$00$00",
            b"pbkdf2-sha256$10$zz$00",
        ] {
            assert!(!password_matches(bad, "s3cret"));
        }
    }

    /// Root (an admin) and bob, auth on with `secret`.
    fn store(secret: &[u8]) -> AuthStore {
        let mut s = AuthStore::default();
        for c in [
            AuthCommand::UserAdd {
                name: "root".into(),
                password: None,
            },
            AuthCommand::UserGrantRole {
                user: "root".into(),
                role: "root".into(),
            },
            AuthCommand::UserAdd {
                name: "bob".into(),
                password: None,
            },
            AuthCommand::Enable {
                secret: Bytes::copy_from_slice(secret),
            },
        ] {
            s.apply(&c).unwrap();
        }
        s
    }

    #[test]
    fn tokens_name_their_user_until_they_expire() {
        let s = store(b"one secret");
        let t = issue_token(&s, "bob", 1_000).unwrap();
        let bob = s.user("bob").unwrap().generation;
        assert_eq!(verify_token(&s, &t, 1_000).unwrap(), ("bob".into(), bob));
        assert_eq!(
            verify_token(&s, &t, 1_000 + 299).unwrap(),
            ("bob".into(), bob)
        );
        // Issued by a member whose clock is ahead: taken within the skew
        // allowed, not beyond.
        assert!(verify_token(&s, &t, 1_000 - 60).is_ok());
        assert_eq!(
            verify_token(&s, &t, 1_000 - 61),
            Err(KvError::InvalidAuthToken)
        );
        assert_eq!(
            verify_token(&s, &t, 1_000 + 300),
            Err(KvError::InvalidAuthToken)
        );
        assert!(issue_token(&s, "nobody", 1_000).is_none());
        // Another secret (auth turned off and on) knows none of them.
        let other = store(b"another secret");
        assert_eq!(
            verify_token(&other, &t, 1_000),
            Err(KvError::InvalidAuthToken)
        );
    }

    #[test]
    fn altered_or_stale_tokens_are_refused() {
        let mut s = store(b"k");
        let t = issue_token(&s, "bob", 10).unwrap();
        // Any changed character: the name, the generation, the expiry, the
        // signature; and things that are no token at all.
        for i in 0..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(b).unwrap();
            if altered != t {
                assert!(verify_token(&s, &altered, 10).is_err(), "{altered}");
            }
        }
        let root = hex(b"root");
        let forged = format!("{root}{}", &t[hex(b"bob").len()..]);
        assert!(verify_token(&s, &forged, 10).is_err());
        for junk in ["", ".", "...", "a.b.c.d", "626f62.1.99.zz", "\u{1f600}"] {
            assert!(verify_token(&s, junk, 10).is_err(), "{junk:?}");
        }
        // A new password (or a deleted user) ends the user's tokens.
        s.apply(&AuthCommand::UserChangePassword {
            name: "bob".into(),
            password: Bytes::from_static(b"h"),
        })
        .unwrap();
        assert!(verify_token(&s, &t, 10).is_err());
        let t = issue_token(&s, "bob", 10).unwrap();
        assert!(verify_token(&s, &t, 10).is_ok());
        s.apply(&AuthCommand::UserDelete { name: "bob".into() })
            .unwrap();
        assert!(verify_token(&s, &t, 10).is_err());
    }

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"a"), Bytes::from_static(b"b"));
        assert_eq!(prefix_end(b"a\xff"), Bytes::from_static(b"b"));
        assert_eq!(prefix_end(b"\xff\xff"), Bytes::from_static(&[0]));
    }
}
