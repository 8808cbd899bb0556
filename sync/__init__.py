"""The sync agent: encrypted replication to a blob store, eviction, lifecycle and recall.

Runs as its own process (`pacs-edge sync`). It shares the data home and the
SQLite index with the appliance, and is the only process that holds cloud
credentials.

Errors: every error of the sync package is in this tree, each a PacsEdgeError
(appliance/base/errors.py), so the agent logs its message and the command line
shows its message and hint. The blob store's subtree is documented with its
contract (sync/blobstore/base.py), the cloud format's in sync/pack/pack_errors.py;
provisioning's errors (key files, rotation lock) pass through unchanged.

Tree::

    PacsEdgeError                 (appliance.base.errors)
    ├── BlobStoreError            a blob store operation failed (operation, name; blobstore/base.py)
    │   ├── BlobNotFound          no blob by that name
    │   ├── BlobExists            put of a name that exists
    │   ├── BlobRangeError        range outside the blob
    │   ├── BlobOffline           archived: rehydrate first
    │   ├── BlobStoreUnavailable  the store cannot be reached or refused us
    │   │   └── TransientBlobError    worth retrying (timeouts, 5xx, throttling)
    │   │       └── BlobIntegrityError    the store did not keep what put sent
    │   └── CredentialsError      no usable Azure connection string (blobstore/factory.py)
    ├── PackError                 the cloud format (pack/pack_errors.py)
    │   ├── PackFormatError       a newer format, or content this version does not read
    │   ├── PackIntegrityError    authentication failed: modified, truncated, swapped
    │   │   ├── TruncatedPackError    the stream ended before the final segment
    │   │   └── MisfiledManifest  a manifest filed under another study's key (restore.py)
    │   ├── WrongKeyError         wrapped for another site key or reader
    │   └── PackSourceError       a local file changed under the pack writer
    ├── CloudCopyChanged          a pack in the cloud is not the one verified (cloud.py)
    ├── VersionTaken              the cloud holds a study version the index does not (cloud.py)
    ├── EvictionNeedsEscrow       eviction refused: the site key has no escrow (escrow_gate.py)
    ├── NotEvictable              the study cannot be evicted yet (evict.py)
    ├── RecallFailed              a study could not be brought back from the cloud (recall.py)
    │   └── CloudCopyMissing      a blob of a verified pack is not in the cloud any more
    ├── RestoreConflict           a cloud version belongs to a study held locally (restore.py)
    ├── StudyAtRisk               the only copy of some instances is a damaged pack (scrub.py)
    ├── NotThisBoxsCloud          the cloud holds none of the newest packs (container_check.py)
    ├── StopRequested             the agent stops: thread work ends early (threads.py)
    ├── ReaderError               a reader registry edit or grant cannot be done (readers.py)
    └── ReaderClientError         the remote reader's pull (reader_client.py)
        ├── NotGranted            no granted version of that study for this reader
        ├── NothingLeft           every instance of the study left it for another study
        ├── ReaderIntegrityError  a key object, manifest or pack failed verification
        ├── NewerFormat           a blob in a format only a newer pacs-edge reads
        └── PullWriteFailed       the target folder did not take a file (a full disk)
"""
