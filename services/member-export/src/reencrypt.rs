//! Re-encryption after a key rotation: a background task moves every stored profile that is
//! sealed under another key than `encryption.current` to the current key, a page at a time,
//! so the old key can be retired.
//!
//! Each row is rewritten only if it still holds what was read (same version and key id): a
//! change recorded meanwhile is already sealed under the current key and wins. Several
//! replicas may run it at once; the guard makes their work idempotent. A profile that cannot
//! be decrypted (its key is no longer configured) is left as it is and counted.

use std::{sync::Arc, time::Duration};

use sea_orm::{
    ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
    sea_query::Expr,
};
use tokio_util::sync::CancellationToken;

use crate::{
    crypto::ProfileCipher,
    metrics::MemberMetrics,
    store::{Store, db_error, members},
};

/// Rows read per page.
const PAGE: u64 = 500;

/// The task; see the module docs.
#[derive(Debug, Clone)]
pub struct Reencrypt {
    /// The member table.
    pub store: Store,
    /// The keys.
    pub cipher: Arc<ProfileCipher>,
    /// How often it looks for rows under old keys.
    pub interval: Duration,
    /// Counters.
    pub metrics: MemberMetrics,
}

impl Reencrypt {
    /// Runs until `shutdown`.
    ///
    /// # Errors
    /// Never; failures are logged and tried again next time.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            match self.pass(&shutdown).await {
                Ok((moved, unreadable)) if moved + unreadable > 0 => tracing::info!(
                    moved,
                    unreadable,
                    key = %self.cipher.current(),
                    "profiles re-encrypted under the current key"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "re-encryption failed; trying again later"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One pass over every row under another key: (moved, left undecryptable).
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn pass(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<(u64, u64), mall_grpc::ServiceError> {
        use members::Column as C;
        let current = self.cipher.current().to_owned();
        let (mut moved, mut unreadable) = (0, 0);
        let mut after = String::new();
        while !shutdown.is_cancelled() {
            let rows = members::Entity::find()
                .filter(C::KeyId.is_not_null())
                .filter(C::KeyId.ne(current.as_str()))
                .filter(C::MemberId.gt(after.as_str()))
                .order_by_asc(C::MemberId)
                .limit(PAGE)
                .all(self.store.db())
                .await
                .map_err(|e| db_error(e, "read profiles under old keys"))?;
            let Some(last) = rows.last() else {
                break;
            };
            after = last.member_id.clone();
            for row in rows {
                let (Some(key_id), Some(sealed)) = (&row.key_id, &row.profile) else {
                    continue;
                };
                let Ok(plain) = self.cipher.decrypt(&row.member_id, key_id, sealed) else {
                    unreadable += 1;
                    continue;
                };
                let (new_key, resealed) = self.cipher.encrypt(&row.member_id, &plain);
                let written = members::Entity::update_many()
                    .col_expr(C::Profile, Expr::value(resealed))
                    .col_expr(C::KeyId, Expr::value(new_key))
                    .filter(C::MemberId.eq(row.member_id.as_str()))
                    .filter(C::Version.eq(row.version))
                    .filter(C::KeyId.eq(key_id.as_str()))
                    .exec(self.store.db())
                    .await
                    .map_err(|e| db_error(e, "re-encrypt a profile"))?;
                moved += written.rows_affected;
            }
        }
        self.metrics.reencrypted.inc_by(moved);
        Ok((moved, unreadable))
    }
}
