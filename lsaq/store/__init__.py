"""The artifact store: every result's stable home, a local directory or S3-compatible object storage.

* :mod:`lsaq.store.keys`: key validation, slugs and the layout (``<model>/<revision>/builds/<device>/<build-id>/``).
* :mod:`lsaq.store.backend`: the contract both backends keep, and the store's errors;
  :mod:`lsaq.store.local` and :mod:`lsaq.store.s3` implement it.
* :mod:`lsaq.store.manifest`: a build's ``manifest.json`` (:class:`~lsaq.store.manifest.BuildManifest`) and
  ``latest.json``.
* :mod:`lsaq.store.publish` and :mod:`lsaq.store.download`: atomic publishing, listing, verified downloads.
* :mod:`lsaq.store.stage`: the public functions ``open_store``, ``publish``, ``list_builds``, ``download``.

Torch-free and Prefect-free: any worker or device reads the store with the core alone.
"""
