"""Storage backends behind one interface (`base.Backend`): a local directory (`local.LocalBackend`) and any
fsspec filesystem, S3 in practice (`object_store.FsspecBackend`).

Layout (identical on both; DESIGN §3):

    <root>/<name>/<version>/senses.safetensors
    <root>/<name>/<version>/signature.json       <- optional (edits_store.signing)
    <root>/<name>/<version>/manifest.json        <- written last: the commit marker
    <root>/<name>/_seq/<seq:012d>-<version>      <- publish order: a per-name sequence number, claimed exclusively
    <root>/<name>/_aliases/<alias>.json          <- one small JSON document per alias (with its move counter)
    <root>/<name>/_history/<alias>/<seq:012d>.json <- append-only alias history (who/when/from/to)
    <root>/.staging/<uuid>/, <root>/.trash/<uuid>/  <- local only: versions being written / deleted
    <root>/_leases/<name>/<version>/<uuid>       <- S3 only: a publisher is writing this version
    <root>/_fences/<name>/<version>/<uuid>       <- S3 only: a gc or deleter is removing this version's files

Atomicity and races:
- local: a version is written and fsynced in ``.staging``, read back through the loader, and appears with one
  ``os.rename`` under the pack's ``flock``; a committed version is never moved (a second publisher of the same
  content finds the folder taken and returns "already there"). gc moves a staging folder into ``.trash`` by
  rename before deleting it, so it can never delete part of a folder a publisher is about to commit. Alias
  moves and deletions take the same ``flock``.
- fsspec/S3: objects are written whole by single PUTs. A version's files are written first, read back, and its
  manifest is PUT last with ``If-None-Match: *`` (exactly one publisher commits). A publisher holds a lease
  object while it writes; gc and deletion put a fence object, then look for leases: gc skips a version with a
  live lease, deletion leaves its files to the publisher; a publisher waits while a live fence exists before
  writing. (Fence then look / lease then look: at least one side sees the other, so gc or a deleter can never
  remove a file under a publisher's manifest.) Alias documents are replaced with ``If-Match`` on their ETag
  (``If-None-Match`` when new): a lost race is a ConcurrentUpdateError, never a lost move. gc aborts multipart
  uploads older than its cutoff.
- Every backend calls ``hook(point)`` at named points of its writers when a hook is set: a test seam to hold a
  writer inside a race window; production code never sets it.
"""
