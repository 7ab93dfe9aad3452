use super::*;
use rand::RngCore;

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

async fn wait_outcome(p: &PartialBlob) -> Outcome {
    let mut rx = p.subscribe();
    loop {
        let o = p.outcome();
        if o != Outcome::Pending {
            return o;
        }
        rx.changed().await.unwrap();
    }
}

#[tokio::test]
async fn out_of_order_pieces_commit_after_verification() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let data = random(300 * 1024 + 17);
    let digest = Digest::of(&data);
    let p = store.partial(&digest, data.len() as u64).await.unwrap();
    let reader = {
        let p = p.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            while (out.len() as u64) < p.size() {
                out.extend_from_slice(&p.read_at(out.len() as u64, 10_000).await.unwrap());
            }
            out
        })
    };
    let cut = 100 * 1024;
    p.write_at(cut as u64, Bytes::copy_from_slice(&data[cut..])).await.unwrap();
    p.write_at(0, Bytes::copy_from_slice(&data[..cut])).await.unwrap();
    assert_eq!(reader.await.unwrap(), data);
    assert_eq!(wait_outcome(&p).await, Outcome::Complete);
    assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
    assert!(store.existing_partial(&digest).await.unwrap().is_none());
}

#[tokio::test]
async fn digest_mismatch_discards_and_fails_readers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let data = random(100_000);
    let digest = Digest::of(&data);
    let p = store.partial(&digest, data.len() as u64).await.unwrap();
    let mut bad = data.clone();
    bad[500] ^= 1;
    p.write_at(0, Bytes::from(bad)).await.unwrap();
    assert!(matches!(wait_outcome(&p).await, Outcome::Failed(_)));
    assert!(p.read_at(0, 10).await.is_err());
    assert!(!store.blob_path(&digest).exists());
    assert!(store.existing_partial(&digest).await.unwrap().is_none());
}

#[tokio::test]
async fn durable_intervals_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = random(256 * 1024);
    let digest = Digest::of(&data);
    {
        let store = Store::open(dir.path(), 64 * 1024).unwrap();
        let p = store.partial(&digest, data.len() as u64).await.unwrap();
        p.write_at(0, Bytes::copy_from_slice(&data[..100_000])).await.unwrap();
        // A range read by a lazy puller: not a whole piece, and from a peer.
        p.mark_untrusted(200_000..200_100);
        p.write_at(200_000, Bytes::copy_from_slice(&data[200_000..200_100])).await.unwrap();
        // Wait until the finisher recorded both intervals.
        for _ in 0..300 {
            if store.inner.meta.partial(&digest).unwrap().is_some_and(|r| r.spans.len() == 2) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        store.shutdown().await;
    }
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let p = store.existing_partial(&digest).await.unwrap().expect("resumable");
    assert_eq!(p.written().spans(), &[0..100_000, 200_000..200_100]);
    assert!(p.is_untrusted(200_050..200_051));
    assert!(!p.is_untrusted(0..100_000));
    p.write_at(100_000, Bytes::copy_from_slice(&data[100_000..200_000])).await.unwrap();
    p.write_at(200_100, Bytes::copy_from_slice(&data[200_100..])).await.unwrap();
    assert_eq!(wait_outcome(&p).await, Outcome::Complete);
    assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
}

#[tokio::test]
async fn put_blob_rejects_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let d = Digest::of(b"manifest");
    assert!(store.put_blob(d, Bytes::from_static(b"other")).await.is_err());
    assert!(store.read_blob(&d).await.unwrap().is_none());
    store.put_blob(d, Bytes::from_static(b"manifest")).await.unwrap();
    assert_eq!(store.read_blob(&d).await.unwrap().unwrap(), Bytes::from_static(b"manifest"));
}

#[tokio::test]
async fn empty_blob_completes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let d = Digest::of(b"");
    let p = store.partial(&d, 0).await.unwrap();
    assert_eq!(wait_outcome(&p).await, Outcome::Complete);
    assert_eq!(store.blob_size(&d), Some(0));
}

#[tokio::test]
async fn reads_are_recorded_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let d = Digest::of(b"manifest");
    store.put_blob(d, Bytes::from_static(b"manifest")).await.unwrap();
    let record = ManifestRecord {
        media_type: "m".into(),
        size: 8,
        registry: "r".into(),
        repository: "a".into(),
        created: 1,
        last_pulled: 1,
        references: vec![],
        pinned: false,
    };
    store.put_manifest(d, record).await.unwrap();
    let before = store.blob_record(&d).unwrap().unwrap().last_access;
    store.touch(&d);
    store.flush_accesses().await.unwrap();
    assert!(store.manifest(&d).unwrap().unwrap().last_pulled >= before);
    assert!(store.manifest(&d).unwrap().unwrap().last_pulled > 1);
    assert!(store.blob_record(&d).unwrap().unwrap().last_access >= before);
}

#[tokio::test]
async fn events_follow_what_the_store_can_serve() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let mut events = store.subscribe();
    let good = random(1000);
    let good_digest = Digest::of(&good);
    store.put_blob(good_digest, Bytes::from(good)).await.unwrap();
    assert_eq!(events.recv().await.unwrap(), StoreEvent::Holding(ContentKey::Digest(good_digest)));
    assert_eq!(store.total_bytes(), 1000);

    let data = random(100_000);
    let digest = Digest::of(&data);
    let p = store.partial(&digest, data.len() as u64).await.unwrap();
    // Advertised as soon as it starts arriving.
    assert_eq!(events.recv().await.unwrap(), StoreEvent::Holding(ContentKey::Digest(digest)));
    let mut held = store.held_keys().await.unwrap();
    held.sort_by_key(|k| k.to_string());
    let mut want = vec![ContentKey::Digest(good_digest), ContentKey::Digest(digest)];
    want.sort_by_key(|k| k.to_string());
    assert_eq!(held, want);

    let mut bad = data.clone();
    bad[7] ^= 1;
    p.write_at(0, Bytes::from(bad)).await.unwrap();
    assert!(matches!(wait_outcome(&p).await, Outcome::Failed(_)));
    assert!(p.is_corrupt());
    assert_eq!(events.recv().await.unwrap(), StoreEvent::Dropped(ContentKey::Digest(digest)));

    let record = TagRecord { digest: good_digest, media_type: "x".into(), checked_at: 1 };
    store.put_tag("r.example/app:v1".into(), record).await.unwrap();
    assert_eq!(events.recv().await.unwrap(), StoreEvent::Holding(ContentKey::tag("r.example", "app", "v1")));
    assert_eq!(store.held_keys().await.unwrap().len(), 2);
}

#[tokio::test]
async fn eviction_removes_least_recently_read_blobs_and_withdraws_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let blobs: Vec<(Digest, Vec<u8>)> = (0..3).map(|_| random(1000)).map(|b| (Digest::of(&b), b)).collect();
    for (d, b) in &blobs {
        store.put_blob(*d, Bytes::from(b.clone())).await.unwrap();
    }
    // Blob 0 is read after the others were written: blob 1 is now the least recently used.
    let mut events = store.subscribe();
    store.touch(&blobs[0].0);
    store.inner.accesses.lock().unwrap().insert(blobs[0].0, unix_now() + 10);
    store.inner.accesses.lock().unwrap().insert(blobs[2].0, unix_now() + 5);
    let removed = store.evict_to(2000).await.unwrap();
    assert_eq!(removed, vec![blobs[1].0]);
    assert_eq!(store.total_bytes(), 2000);
    assert!(!store.blob_path(&blobs[1].0).exists());
    assert!(store.blob_path(&blobs[0].0).exists() && store.blob_path(&blobs[2].0).exists());
    assert_eq!(events.recv().await.unwrap(), StoreEvent::Dropped(ContentKey::Digest(blobs[1].0)));
    assert!(store.blob_record(&blobs[1].0).unwrap().is_none());
    // Under the target: nothing to do.
    assert!(store.evict_to(2000).await.unwrap().is_empty());
}

#[tokio::test]
async fn idle_partial_blobs_count_against_the_cap_are_evicted_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    // An idle partial: 256 KiB written of a 1 MiB blob, its transfer gone.
    let data = random(1024 * 1024);
    let digest = Digest::of(&data);
    let p = store.partial(&digest, data.len() as u64).await.unwrap();
    p.write_at(0, Bytes::copy_from_slice(&data[..256 * 1024])).await.unwrap();
    for _ in 0..300 {
        if store.inner.meta.partial(&digest).unwrap().is_some_and(|r| !r.spans.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    p.abandon("test: the reader left").await;
    drop(p);
    assert!(store.partial_bytes() >= 256 * 1024, "partial bytes {}", store.partial_bytes());
    let bytes = random(1000);
    let recent = Digest::of(&bytes);
    store.put_blob(recent, Bytes::from(bytes)).await.unwrap();
    store.inner.accesses.lock().unwrap().insert(recent, unix_now() + 10);
    // Over a cap the complete blob alone fits under: the idle partial (older) goes.
    let policy = EvictionPolicy { max_bytes: Some(100 * 1024), ..Default::default() };
    let target = store.eviction_target(&policy).expect("over the cap");
    assert_eq!(store.evict_to(target).await.unwrap(), vec![digest]);
    assert_eq!(store.partial_bytes(), 0);
    assert!(store.inner.meta.partial(&digest).unwrap().is_none());
    assert!(store.blob_path(&recent).exists());

    // Expiry: a partial not written to for longer than the TTL is removed; a fresh one stays.
    let p = store.partial(&digest, data.len() as u64).await.unwrap();
    p.abandon("test: the reader left").await;
    drop(p);
    assert!(store.expire_partials(std::time::Duration::from_secs(3600)).await.unwrap().is_empty());
    let mut record = store.inner.meta.partial(&digest).unwrap().unwrap();
    record.touched = unix_now() - 7200;
    store.inner.meta.put_partial(&digest, &record).unwrap();
    assert_eq!(store.expire_partials(std::time::Duration::from_secs(3600)).await.unwrap(), vec![digest]);
    assert!(store.existing_partial(&digest).await.unwrap().is_none());
}

/// Caches a blob and returns its digest.
async fn blob(store: &Store, data: &[u8]) -> Digest {
    let d = Digest::of(data);
    store.put_blob(d, Bytes::copy_from_slice(data)).await.unwrap();
    d
}

/// Caches a manifest referencing `refs`, tagged `tag` when given; returns its digest.
async fn manifest(store: &Store, repo: &str, tag: Option<&str>, kind: &str, refs: &[Digest], pulled: u64) -> Digest {
    let body = format!("{{\"repo\":\"{repo}\",\"refs\":{:?}}}", refs.iter().map(|d| d.to_string()).collect::<Vec<_>>());
    let d = blob(store, body.as_bytes()).await;
    let record = ManifestRecord {
        media_type: kind.to_string(),
        size: body.len() as u64,
        registry: "r.test".into(),
        repository: repo.into(),
        created: pulled,
        last_pulled: pulled,
        references: refs.to_vec(),
        pinned: false,
    };
    store.put_manifest(d, record).await.unwrap();
    if let Some(tag) = tag {
        let record = TagRecord { digest: d, media_type: kind.into(), checked_at: pulled };
        store.put_tag(clyde_types::key::tag_name("r.test", repo, tag), record).await.unwrap();
    }
    d
}

struct Catalog {
    shared: Digest,
    app_layer: Digest,
    tool_layer: Digest,
    app_index: Digest,
    app_image: Digest,
    tool_image: Digest,
}

/// `app:v1` is an index over one image; `tool:v1` is an image; both share a layer.
async fn catalog(store: &Store) -> Catalog {
    let shared = blob(store, &random(1000)).await;
    let app_layer = blob(store, &random(2000)).await;
    let tool_layer = blob(store, &random(4000)).await;
    let app_image = manifest(store, "app", None, clyde_types::media::OCI_MANIFEST, &[shared, app_layer], 100).await;
    let app_index = manifest(store, "app", Some("v1"), clyde_types::media::OCI_INDEX, &[app_image], 100).await;
    let tool_image =
        manifest(store, "tool", Some("v1"), clyde_types::media::OCI_MANIFEST, &[shared, tool_layer], 200).await;
    Catalog { shared, app_layer, tool_layer, app_index, app_image, tool_image }
}

#[tokio::test]
async fn images_lists_names_kinds_and_held_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let c = catalog(&store).await;
    let images = store.images().unwrap();
    let names: Vec<&str> = images.iter().map(|e| e.reference.as_str()).collect();
    let child = format!("r.test/app@{}", c.app_image);
    assert_eq!(names, ["r.test/app:v1", "r.test/tool:v1", child.as_str()]);
    let app = &images[0];
    assert_eq!((app.kind, app.digest, app.tagged, app.child), (ManifestKind::Index, c.app_index, true, false));
    let size = |d: &Digest| store.blob_size(d).unwrap();
    assert_eq!(app.size, size(&c.app_index) + size(&c.app_image) + 1000 + 2000);
    assert_eq!(images[1].size, size(&c.tool_image) + 1000 + 4000);
    assert_eq!((images[2].kind, images[2].child, images[2].tagged), (ManifestKind::Image, true, false));
}

#[tokio::test]
async fn prune_keeps_blobs_a_kept_image_shares() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let c = catalog(&store).await;
    let mut events = store.subscribe();
    let select = |e: &ImageEntry| e.reference.contains("/app");
    let plan = store
        .plan_prune(&PruneSelection { select: Some(&select), max_bytes: None, force: false, max_images: None })
        .unwrap();
    assert_eq!(plan.tags, ["r.test/app:v1"]);
    let mut manifests = vec![c.app_index, c.app_image];
    manifests.sort();
    assert_eq!(plan.manifests, manifests);
    assert_eq!(plan.blobs, [c.app_layer]);
    let before = store.total_bytes();
    // Planning is a dry run: nothing changed.
    assert_eq!(store.images().unwrap().len(), 3);
    assert!(store.blob_size(&c.app_layer).is_some());

    assert_eq!(store.apply_prune(&plan).await.unwrap(), plan);
    assert_eq!(store.total_bytes(), before - plan.bytes);
    assert_eq!(store.images().unwrap().iter().map(|e| e.reference.clone()).collect::<Vec<_>>(), ["r.test/tool:v1"]);
    for gone in [c.app_layer, c.app_index, c.app_image] {
        assert_eq!(store.blob_size(&gone), None);
    }
    for kept in [c.shared, c.tool_layer, c.tool_image] {
        assert!(store.blob_size(&kept).is_some());
    }
    assert_eq!(store.tag("r.test/app:v1").unwrap(), None);
    let mut dropped = Vec::new();
    while let Ok(StoreEvent::Dropped(k)) = events.try_recv() {
        dropped.push(k);
    }
    assert!(dropped.contains(&ContentKey::Tag("r.test/app:v1".into())));
    assert!(dropped.contains(&ContentKey::Digest(c.app_layer)));
    assert_eq!(dropped.len(), 4, "{dropped:?}");
}

#[tokio::test]
async fn prune_to_a_size_removes_least_recently_pulled_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let c = catalog(&store).await;
    // app (pulled at 100) goes before tool (200); dropping app alone is enough.
    let plan = store
        .plan_prune(&PruneSelection {
            select: None,
            max_bytes: Some(store.total_bytes() - 100),
            force: false,
            max_images: None,
        })
        .unwrap();
    assert_eq!(plan.images, ["r.test/app:v1"]);
    assert_eq!(plan.blobs, [c.app_layer]);
    let nothing = store
        .plan_prune(&PruneSelection {
            select: None,
            max_bytes: Some(store.total_bytes()),
            force: false,
            max_images: None,
        })
        .unwrap();
    assert_eq!(nothing, PrunePlan::default());
    let all =
        store.plan_prune(&PruneSelection { select: None, max_bytes: Some(0), force: false, max_images: None }).unwrap();
    assert_eq!(all.images.len(), 2);
    assert_eq!(all.blobs.len(), 3);
}

#[tokio::test]
async fn a_second_opener_of_the_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let err = Store::open(dir.path(), 64 * 1024).err().unwrap();
    assert!(matches!(err, StoreError::InUse(_)), "{err}");
    store.shutdown().await;
    drop(store);
    Store::open(dir.path(), 64 * 1024).unwrap();
}

#[tokio::test]
async fn a_manifest_recorded_between_plan_and_prune_keeps_its_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let c = catalog(&store).await;
    let select = |e: &ImageEntry| e.reference.contains("/app");
    let plan = store
        .plan_prune(&PruneSelection { select: Some(&select), max_bytes: None, force: false, max_images: None })
        .unwrap();
    assert_eq!(plan.blobs, [c.app_layer]);
    // A pull records another image using app's layer before the prune runs.
    manifest(&store, "other", Some("v1"), clyde_types::media::OCI_MANIFEST, &[c.app_layer], 300).await;
    let applied = store.apply_prune(&plan).await.unwrap();
    assert!(applied.blobs.is_empty(), "{applied:?}");
    assert!(store.blob_size(&c.app_layer).is_some());
    assert_eq!(store.blob_size(&c.app_index), None);
}

#[tokio::test]
async fn a_size_no_prune_of_images_can_reach_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    catalog(&store).await;
    blob(&store, &random(5000)).await;
    let err = store
        .plan_prune(&PruneSelection { select: None, max_bytes: Some(1000), force: false, max_images: None })
        .unwrap_err();
    assert!(matches!(err, StoreError::Unprunable { unowned: 5000, max: 1000 }), "{err}");
}

#[tokio::test]
async fn pinned_images_survive_eviction_and_unforced_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let c = catalog(&store).await;
    store.set_pins(&["r\\.test/app:.*".to_string()]).unwrap();
    let images = store.images().unwrap();
    assert!(images.iter().find(|e| e.reference == "r.test/app:v1").is_some_and(|e| e.pinned));
    assert!(images.iter().find(|e| e.reference == "r.test/tool:v1").is_some_and(|e| !e.pinned));

    // A prune that selects everything keeps the pinned image and says so; forced, it goes.
    let all = |_: &ImageEntry| true;
    let plan = store
        .plan_prune(&PruneSelection { select: Some(&all), max_bytes: None, force: false, max_images: None })
        .unwrap();
    assert_eq!(plan.images, ["r.test/tool:v1"]);
    assert_eq!(plan.pinned, ["r.test/app:v1"]);
    assert_eq!(plan.blobs, [c.tool_layer]);
    let forced = store
        .plan_prune(&PruneSelection { select: Some(&all), max_bytes: None, force: true, max_images: None })
        .unwrap();
    assert!(forced.images.contains(&"r.test/app:v1".to_string()) && forced.pinned.is_empty());

    // Eviction down to nothing: every blob goes but those the pinned image references.
    store.evict_to(0).await.unwrap();
    for kept in [c.shared, c.app_layer, c.app_index, c.app_image] {
        assert!(store.blob_size(&kept).is_some(), "a pinned image's blob was evicted");
    }
    assert_eq!(store.blob_size(&c.tool_layer), None);
}

fn piece_list(data: &[u8], piece: usize) -> PieceHashes {
    let layout = PieceLayout::new(data.len() as u64, piece as u64);
    PieceHashes::complete(layout, data.chunks(piece).map(clyde_types::hash_piece).collect()).unwrap()
}

#[tokio::test]
async fn pending_pieces_are_readable_once_they_match_and_dropped_when_they_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let piece = 64 * 1024;
    let store = Store::open(dir.path(), piece as u64).unwrap();
    let data = random(4 * piece + 100);
    let digest = Digest::of(&data);
    let p = store.partial(&digest, data.len() as u64).await.unwrap();
    // Piece 0 from the upstream (readable at once); pieces 1 and 2 from a peer, 2 rotten.
    p.write_at(0, Bytes::copy_from_slice(&data[..piece])).await.unwrap();
    let mut rotten = data[piece..3 * piece].to_vec();
    rotten[piece + 7] ^= 1;
    p.write_pending_at(piece as u64, vec![Bytes::from(rotten)]).await.unwrap();
    assert!(p.held().covers(0..3 * piece as u64));
    assert_eq!(p.written_from(0), piece as u64, "pending bytes are not readable");
    assert!(p.is_pending(piece as u64));
    // No hash known yet: nothing is decided.
    let settled = p.settle().await.unwrap();
    assert_eq!(settled.unknown, vec![1, 2]);
    assert_eq!(p.written_from(0), piece as u64);
    p.expect(&piece_list(&data, piece));
    let settled = p.settle().await.unwrap();
    assert_eq!((settled.verified, settled.corrupt), (vec![1], vec![2]));
    // The matching piece is readable, also by a ranged reader; the rotten one is gone.
    assert_eq!(p.read_range_at(piece as u64, piece as u64).await.unwrap(), &data[piece..2 * piece]);
    assert_eq!(p.held().first_gap(0..data.len() as u64), Some(2 * piece as u64..data.len() as u64));
    // Fetched again: right bytes pass. A pending write never overwrites written bytes.
    let mut again = vec![0u8; 2 * piece];
    again.extend_from_slice(&data[2 * piece..3 * piece]);
    p.write_pending_at(0, vec![Bytes::from(again)]).await.unwrap();
    // The hash it failed against is asked for again (it may have been the wrong one).
    assert_eq!(p.settle().await.unwrap().unknown, vec![2]);
    p.expect(&piece_list(&data, piece));
    assert_eq!(p.settle().await.unwrap().verified, vec![2]);
    assert_eq!(p.read_range_at(0, piece as u64).await.unwrap(), &data[..piece]);
    // The last piece with no list entry: left for the whole blob's digest.
    p.write_at(3 * piece as u64, Bytes::copy_from_slice(&data[3 * piece..4 * piece])).await.unwrap();
    p.write_pending_at(4 * piece as u64, vec![Bytes::copy_from_slice(&data[4 * piece..])]).await.unwrap();
    assert_eq!(p.settle().await.unwrap().verified, vec![4], "the list from above covers it");
    assert_eq!(wait_outcome(&p).await, Outcome::Complete);
    // The committed blob's piece hashes were recorded from its verified bytes.
    let s = store.clone();
    let list = s.blocking(move |s| s.piece_hashes(&digest)).await.unwrap().unwrap();
    assert_eq!(list, piece_list(&data, piece));
}

#[tokio::test]
async fn pieces_nobody_vouches_for_wait_for_the_whole_blob() {
    let dir = tempfile::tempdir().unwrap();
    let piece = 64 * 1024;
    let store = Store::open(dir.path(), piece as u64).unwrap();
    let data = random(2 * piece);
    let digest = Digest::of(&data);
    let p = store.partial(&digest, data.len() as u64).await.unwrap();
    p.write_pending_at(0, vec![Bytes::copy_from_slice(&data[..piece])]).await.unwrap();
    assert_eq!(p.settle().await.unwrap().unknown, vec![0]);
    p.trust_later(&[0]);
    assert!(p.is_untrusted(0..1) && !p.is_pending(0));
    // This node vouches for nothing a peer sent unchecked, only for upstream bytes.
    p.write_at(piece as u64, Bytes::copy_from_slice(&data[piece..])).await.unwrap();
    let vouched = p.vouched_hashes().await.unwrap();
    assert_eq!((vouched.get(0), vouched.get(1)), (None, Some(clyde_types::hash_piece(&data[piece..]))));
    assert_eq!(wait_outcome(&p).await, Outcome::Complete);
}

#[tokio::test]
async fn a_blob_that_rotted_on_disk_vouches_for_no_piece() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 * 1024).unwrap();
    let data = random(300_000);
    let digest = Digest::of(&data);
    store.put_blob(digest, Bytes::from(data.clone())).await.unwrap();
    let mut bytes = std::fs::read(store.blob_path(&digest)).unwrap();
    bytes[200_000] ^= 1;
    std::fs::write(store.blob_path(&digest), &bytes).unwrap();
    assert!(store.piece_hashes(&digest).unwrap().is_none());
    std::fs::write(store.blob_path(&digest), &data).unwrap();
    assert_eq!(store.piece_hashes(&digest).unwrap(), Some(piece_list(&data, 64 * 1024)));
    // Recorded: rot after this point does not change what it vouches for.
    std::fs::write(store.blob_path(&digest), &bytes).unwrap();
    assert_eq!(store.piece_hashes(&digest).unwrap(), Some(piece_list(&data, 64 * 1024)));
}
