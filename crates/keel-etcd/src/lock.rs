//! etcd's Lock service (`v3lockpb.Lock`): Lock waits until the named lock
//! is held under the caller's lease and answers the key that exists while
//! it is held (for guarding writes with a transaction on it); Unlock
//! deletes that key. See `recipes` for how contenders queue. A Lock call
//! that fails or is abandoned while it waits deletes the key it made (or
//! found there behind another's), as etcd's unlocks, unless another call of
//! the same lease through this node shares it (`recipes::Contender`).

use crate::auth::check_recipe;
use crate::recipes::{as_recipe_error, key_of, prefix_of, Recipes};
use keel_etcd_proto::v3lockpb::lock_server::Lock;
use keel_etcd_proto::v3lockpb::*;
use keel_kv::Access;
use tonic::{Request, Response, Status};

pub struct LockApi(pub(crate) Recipes);

/// The answer when the caller's lease ended while it waited (its key, and
/// with it its place in the queue, is gone): etcd 3.5's; 3.4 does not look
/// and answers as if the lock were held.
pub const SESSION_EXPIRED: &str = "mutex: session is expired";

/// Acquires the lock `r` names with `rec`, the recipes of its caller.
async fn acquire(rec: &Recipes, r: LockRequest) -> Result<LockResponse, Status> {
    let lease = rec.lease_or_grant(r.lease).await?;
    let key = key_of(&r.name, lease);
    let prefix = prefix_of(&r.name);
    let contender = rec.contend(&key).await;
    let claim = contender.claim(&prefix, Default::default(), lease).await?;
    rec.wait_deletes(&prefix, claim.rev - 1).await?;
    let header = rec.still_owned(&key, claim.rev, SESSION_EXPIRED).await?;
    contender.keep(claim.rev);
    Ok(LockResponse { header, key })
}

#[tonic::async_trait]
impl Lock for LockApi {
    async fn lock(&self, r: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        // The caller may read and write the lock's keys (`name/...`), as
        // etcd's lock service needs when it runs them with the caller's
        // token.
        let who = self.0 .0.who(&r).await?;
        check_recipe(&self.0 .0, &who, &prefix_of(&r.get_ref().name))?;
        acquire(&self.0.as_caller(&who), r.into_inner())
            .await
            .map(Response::new)
            .map_err(as_recipe_error)
    }

    async fn unlock(&self, r: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let who = self.0 .0.who(&r).await?;
        let key = &r.get_ref().key;
        self.0
             .0
            .check(&who, |v, user| v.check_range(user, Access::Write, key, &[]))?;
        let header = self
            .0
            .as_caller(&who)
            .delete(r.into_inner().key)
            .await
            .map_err(as_recipe_error)?;
        Ok(Response::new(UnlockResponse { header }))
    }
}
