//! Metadata in an embedded transactional database (redb).
//!
//! redb is pure Rust (no C build on 2 cores), crash-safe with copy-on-write pages and
//! an fsync per commit, and fast for the point lookups the mirror does per request.
//! Records are JSON so a later version can add fields without a migration.

use std::path::Path;

use clyde_types::Digest;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::StoreError;

const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");

/// Separates a tag's key from the kind of `Accept` a variant answers (`#` appears in no
/// registry, repository or tag name).
pub const VARIANT_SEPARATOR: char = '#';

/// The key of what a tag resolves to for clients whose `Accept` is of `kind` (see
/// `clyde_types::media::accept_kind`).
pub fn variant_key(key: &str, kind: &str) -> String {
    format!("{key}{VARIANT_SEPARATOR}{kind}")
}
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// Sizes of blobs as verified manifests' descriptors give them: digest -> size.
const SIZES: TableDefinition<&str, u64> = TableDefinition::new("sizes");
const PARTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("partials");
/// Complete blobs' piece hashes, computed from verified bytes ([`clyde_types::PieceHashes`]'s
/// wire form): never recomputed from a disk that may have rotted since.
const PIECES: TableDefinition<&str, &[u8]> = TableDefinition::new("pieces");

/// Where a tag pointed when it was last checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    /// Unix seconds of the last upstream check (or first fetch).
    pub checked_at: u64,
}

/// A cached manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub size: u64,
    pub registry: String,
    pub repository: String,
    /// Unix seconds when it was first cached.
    pub created: u64,
    /// Unix seconds when a client last fetched it.
    pub last_pulled: u64,
    /// Blobs and child manifests it references.
    #[serde(default)]
    pub references: Vec<Digest>,
    /// Pinned (`clyde load --pin`): never evicted, pruned only when forced.
    #[serde(default)]
    pub pinned: bool,
}

/// A complete blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    pub size: u64,
    pub created: u64,
    /// Unix seconds when a client last read it (flushed in batches).
    #[serde(default)]
    pub last_access: u64,
}

/// A blob still arriving: which bytes are durable on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialRecord {
    pub size: u64,
    pub piece_size: u64,
    /// Indices of pieces whose bytes were fsynced (records of earlier versions).
    #[serde(default)]
    pub durable: Vec<u64>,
    /// Byte intervals `[start, end)` that were fsynced.
    #[serde(default)]
    pub spans: Vec<[u64; 2]>,
    /// Intervals whose bytes came from peers: served to ranged readers only once the whole
    /// blob verified.
    #[serde(default)]
    pub untrusted: Vec<[u64; 2]>,
    /// When bytes were last recorded (unix seconds): eviction and expiry go by it.
    #[serde(default)]
    pub touched: u64,
}

/// Changes the JSON record under `key` in place, if there is one.
fn update<T: Serialize + DeserializeOwned>(
    table: &mut redb::Table<'_, &str, &[u8]>,
    key: &str,
    change: impl FnOnce(&mut T),
) -> Result<(), StoreError> {
    let Some(bytes) = table.get(key).map_err(db_err)?.map(|v| v.value().to_vec()) else { return Ok(()) };
    let mut record: T = serde_json::from_slice(&bytes).map_err(db_err)?;
    change(&mut record);
    let bytes = serde_json::to_vec(&record).map_err(db_err)?;
    table.insert(key, bytes.as_slice()).map_err(db_err)?;
    Ok(())
}

pub(crate) struct Meta {
    db: Database,
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Metadata(e.to_string())
}

impl Meta {
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        for table in [TAGS, MANIFESTS, BLOBS, PARTIALS, PIECES] {
            txn.open_table(table).map_err(db_err)?;
        }
        txn.open_table(SIZES).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(table).map_err(db_err)?;
        let Some(value) = table.get(key).map_err(db_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value()).map(Some).map_err(db_err)
    }

    fn put<T: Serialize>(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(db_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(table).map_err(db_err)?.insert(key, bytes.as_slice()).map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    fn all<T: DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            out.push((k.value().to_string(), serde_json::from_slice(v.value()).map_err(db_err)?));
        }
        Ok(out)
    }

    pub(crate) fn tag(&self, key: &str) -> Result<Option<TagRecord>, StoreError> {
        self.get(TAGS, key)
    }

    pub(crate) fn put_tag(&self, key: &str, record: &TagRecord) -> Result<(), StoreError> {
        self.put(TAGS, key, record)
    }

    pub(crate) fn manifest(&self, digest: &Digest) -> Result<Option<ManifestRecord>, StoreError> {
        self.get(MANIFESTS, &digest.to_string())
    }

    pub(crate) fn put_manifest(&self, digest: &Digest, record: &ManifestRecord) -> Result<(), StoreError> {
        self.put(MANIFESTS, &digest.to_string(), record)
    }

    pub(crate) fn manifests(&self) -> Result<Vec<(String, ManifestRecord)>, StoreError> {
        self.all(MANIFESTS)
    }

    /// Every tag's record (not the per-`Accept` variants, see [`variant_key`]).
    pub(crate) fn tags(&self) -> Result<Vec<(String, TagRecord)>, StoreError> {
        Ok(self.all(TAGS)?.into_iter().filter(|(k, _)| !k.contains(VARIANT_SEPARATOR)).collect())
    }

    pub(crate) fn partial(&self, digest: &Digest) -> Result<Option<PartialRecord>, StoreError> {
        self.get(PARTIALS, &digest.to_string())
    }

    pub(crate) fn put_partial(&self, digest: &Digest, record: &PartialRecord) -> Result<(), StoreError> {
        self.put(PARTIALS, &digest.to_string(), record)
    }

    /// Records more durable pieces of a partial blob, only while its record exists: a late
    /// update from a discarded download must not bring the record back.
    pub(crate) fn update_partial(&self, digest: &Digest, record: &PartialRecord) -> Result<(), StoreError> {
        let key = digest.to_string();
        let bytes = serde_json::to_vec(record).map_err(db_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PARTIALS).map_err(db_err)?;
            let existing = table.get(key.as_str()).map_err(db_err)?.map(|v| v.value().to_vec());
            let same_blob = existing
                .and_then(|v| serde_json::from_slice::<PartialRecord>(&v).ok())
                .is_some_and(|r| r.size == record.size && r.piece_size == record.piece_size);
            if same_blob {
                table.insert(key.as_str(), bytes.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    /// Records blob sizes from a verified manifest's descriptors (the first size recorded
    /// for a digest stays: a digest has one size).
    pub(crate) fn put_sizes(&self, sizes: &[(Digest, u64)]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(SIZES).map_err(db_err)?;
            for (digest, size) in sizes {
                let key = digest.to_string();
                if table.get(key.as_str()).map_err(db_err)?.is_none() {
                    table.insert(key.as_str(), size).map_err(db_err)?;
                }
            }
        }
        txn.commit().map_err(db_err)
    }

    /// A blob's size as a verified manifest's descriptor gives it.
    pub(crate) fn described_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SIZES).map_err(db_err)?;
        Ok(table.get(digest.to_string().as_str()).map_err(db_err)?.map(|v| v.value()))
    }

    pub(crate) fn partials(&self) -> Result<Vec<(String, PartialRecord)>, StoreError> {
        self.all(PARTIALS)
    }

    pub(crate) fn remove_partial(&self, digest: &Digest) -> Result<(), StoreError> {
        self.remove(PARTIALS, &digest.to_string())
    }

    /// Records when manifests were last pulled and blobs last read, in one transaction.
    pub(crate) fn record_access(&self, accesses: &[(Digest, u64)]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut manifests = txn.open_table(MANIFESTS).map_err(db_err)?;
            let mut blobs = txn.open_table(BLOBS).map_err(db_err)?;
            for (digest, at) in accesses {
                let key = digest.to_string();
                update(&mut manifests, &key, |r: &mut ManifestRecord| r.last_pulled = r.last_pulled.max(*at))?;
                update(&mut blobs, &key, |r: &mut BlobRecord| r.last_access = r.last_access.max(*at))?;
            }
        }
        txn.commit().map_err(db_err)
    }

    pub(crate) fn blobs(&self) -> Result<Vec<(String, BlobRecord)>, StoreError> {
        self.all(BLOBS)
    }

    /// Forgets a blob and its piece hashes, in one transaction.
    pub(crate) fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let key = digest.to_string();
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            txn.open_table(BLOBS).map_err(db_err)?.remove(key.as_str()).map_err(db_err)?;
            txn.open_table(PIECES).map_err(db_err)?.remove(key.as_str()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// A complete blob's piece hashes (wire form), if recorded.
    pub(crate) fn pieces(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PIECES).map_err(db_err)?;
        Ok(table.get(digest.to_string().as_str()).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Records a complete blob's piece hashes (wire form).
    pub(crate) fn put_pieces(&self, digest: &Digest, list: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(PIECES).map_err(db_err)?.insert(digest.to_string().as_str(), list).map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    pub(crate) fn remove_manifest(&self, digest: &Digest) -> Result<(), StoreError> {
        self.remove(MANIFESTS, &digest.to_string())
    }

    /// Removes a tag and its per-`Accept` variants.
    pub(crate) fn remove_tag(&self, key: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(TAGS).map_err(db_err)?;
            table.remove(key).map_err(db_err)?;
            let (from, to) =
                (format!("{key}{VARIANT_SEPARATOR}"), format!("{key}{}", (VARIANT_SEPARATOR as u8 + 1) as char));
            let variants: Vec<String> = table
                .range(from.as_str()..to.as_str())
                .map_err(db_err)?
                .filter_map(|e| e.ok().map(|(k, _)| k.value().to_string()))
                .collect();
            for variant in variants {
                table.remove(variant.as_str()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    fn remove(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(table).map_err(db_err)?.remove(key).map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    pub(crate) fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>, StoreError> {
        self.get(BLOBS, &digest.to_string())
    }

    /// Records a blob as complete (with its piece hashes, when known) and forgets its partial
    /// state, in one transaction.
    pub(crate) fn complete_blob(
        &self,
        digest: &Digest,
        record: &BlobRecord,
        pieces: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let key = digest.to_string();
        let bytes = serde_json::to_vec(record).map_err(db_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            txn.open_table(PARTIALS).map_err(db_err)?.remove(key.as_str()).map_err(db_err)?;
            txn.open_table(BLOBS).map_err(db_err)?.insert(key.as_str(), bytes.as_slice()).map_err(db_err)?;
            if let Some(list) = pieces {
                txn.open_table(PIECES).map_err(db_err)?.insert(key.as_str(), list).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }
}
