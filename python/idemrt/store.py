"""A model store: a directory of codecs and priors, each in a folder with a ``model.json`` manifest.

Layout (docs/model_store.md)::

    STORE/
      hyperprior-q1/model.json      {"id": "hyperprior-q1", "kind": "codec", "codec": "bmshj2018-hyperprior",
      hyperprior-q1/weights.safetensors   "quality": 1, "file": "weights.safetensors", "sha256": "..."}
      ffhq/model.json               {"id": "ffhq", "kind": "prior", "preset": "ffhq256", "file": "ffhq_10m.pt",
      ffhq/ffhq_10m.pt                   "sha256": "..."}

Each immediate sub-folder of the store that holds a ``model.json`` is one model. The manifest names its
``kind`` (a row of :data:`KINDS`: one :class:`StoreEntry` subclass per kind, like compressai's zoo has
one row per model), the architecture (a codec's compressai name and quality; a prior's UNet preset
and/or explicit ``create_model`` config), the weights ``file`` (relative to the model's folder), its
full ``sha256`` and, optionally, ``source`` and ``licence``.

Nothing outside the store directory is read: absolute paths, ``..`` and symbolic links (of the
folder, the manifest or the weights) that lead outside the store are refused. A model whose manifest
is invalid, whose file is missing, corrupt or does not match its sha256, or (after :meth:`ModelStore.verify`)
does not load through :func:`idemrt.load_codec` / :func:`idemrt.load_unet`, is *unavailable* with the
reason; the others still work.

Routing: :meth:`ModelStore.codec_for` returns the codec an ``.idm`` header names (codec name, quality
and the 16-byte weights digest, :meth:`idemrt.models.codec.Codec.weights_hash`; decided by
:func:`idemrt.bitstream.route`), or raises :class:`idemrt.ModelNotFoundError` saying exactly what is
needed. A prior is chosen by :func:`choose_prior` (its id, else a default, else the only one).
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .errors import CheckpointError, ModelNotFoundError

__all__ = ["AVAILABLE", "KINDS", "MANIFEST", "UNAVAILABLE", "UNCHECKED", "CodecEntry", "ModelStore",
           "PriorEntry", "StoreEntry", "StoreError", "choose_prior"]

MANIFEST = "model.json"
# Manifests larger than this are not JSON a person wrote; refused before parsing.
MAX_MANIFEST_BYTES = 1 << 16

UNCHECKED = "unchecked"  # manifest valid, file not yet hashed
AVAILABLE = "available"
UNAVAILABLE = "unavailable"

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_COMMON_KEYS = {"id", "kind", "file", "sha256", "source", "licence"}


class StoreError(CheckpointError):
    """A model store directory or one of its manifests is unusable."""


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _str(manifest: dict, key: str, *, required: bool = True) -> Optional[str]:
    value = manifest.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise StoreError(f"{key!r} must be a non-empty string, got {value!r}")
    return value


@dataclass
class StoreEntry:
    """One model of the store: what its manifest says, where its file is, and whether it is usable.

    Subclasses (one per ``kind``, registered in :data:`KINDS`) parse their own fields
    (:meth:`parse_fields`), load the weights (:meth:`load`) and describe themselves
    (:meth:`architecture`).
    """

    kind: ClassVar[str]
    extra_keys: ClassVar[frozenset] = frozenset()

    id: str
    folder: str  # the model's folder (resolved, inside the store)
    path: str  # the weights file (resolved, inside the store)
    sha256: str
    source: Optional[str] = None
    licence: Optional[str] = None
    status: str = UNCHECKED
    reason: Optional[str] = None
    _model: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_manifest(cls, manifest: dict, folder: str, root: str) -> "StoreEntry":
        unknown = sorted(set(manifest) - _COMMON_KEYS - cls.extra_keys)
        if unknown:
            raise StoreError(f"unknown manifest keys {unknown} for a {cls.kind}; "
                             f"allowed: {sorted(_COMMON_KEYS | cls.extra_keys)}")
        model_id = _str(manifest, "id")
        if not _ID_RE.fullmatch(model_id):
            raise StoreError(f"id {model_id!r} must be letters, digits and . _ + - (at most 128)")
        sha256 = _str(manifest, "sha256").lower()
        if not _SHA256_RE.fullmatch(sha256):
            raise StoreError(f"sha256 must be the file's full digest (64 hex digits), got {manifest['sha256']!r}")
        return cls(id=model_id, folder=folder, path=_weights_path(_str(manifest, "file"), folder, root),
                   sha256=sha256, source=_str(manifest, "source", required=False),
                   licence=_str(manifest, "licence", required=False), **cls.parse_fields(manifest))

    @classmethod
    def parse_fields(cls, manifest: dict) -> dict:
        """The kind's own fields of the manifest, checked (StoreError if invalid)."""
        return {}

    @property
    def available(self) -> bool:
        return self.status == AVAILABLE

    def architecture(self) -> str:
        raise NotImplementedError

    def load(self, device=None):
        """Load the weights through idemrt's loader (CheckpointError if they do not fit)."""
        raise NotImplementedError

    def check_loaded(self, model) -> None:
        """Further checks of a loaded model against the manifest (CheckpointError on a mismatch)."""

    def check_file(self) -> None:
        """Hash the file: status becomes available, or unavailable with the reason."""
        from .models.checkpoint_io import file_sha256

        if self.status == UNAVAILABLE:
            return
        try:
            _check_no_escape(self.path)
            actual = file_sha256(self.path)
        except OSError as exc:
            self._fail(f"cannot read {self.path}: {exc.strerror or exc}")
            return
        except StoreError as exc:
            self._fail(f"cannot read {self.path}: {exc}")
            return
        if actual != self.sha256:
            self._fail(f"sha256 mismatch: the file hashes to {actual[:16]}..., the manifest says "
                       f"{self.sha256[:16]}...; the file is corrupt or not the one the manifest names")
            return
        self.status = AVAILABLE

    def get(self, device=None):
        """The loaded model (loaded once, then cached); CheckpointError if the entry is unavailable."""
        if self._model is None:
            if self.status == UNCHECKED:
                self.check_file()
            if self.status == UNAVAILABLE:
                raise CheckpointError(f"model {self.id!r} is unavailable: {self.reason}")
            try:
                model = self.load(device)
                self.check_loaded(model)
            except (CheckpointError, ValueError, TypeError) as exc:
                self._fail(f"does not load: {exc}")
                raise CheckpointError(f"model {self.id!r} is unavailable: {self.reason}") from None
            self._model = model
        return self._model

    def verify(self, device=None) -> bool:
        """Hash and load the model (onto ``device``); True if it is available."""
        try:
            self.get(device)
        except CheckpointError:
            pass
        return self.available

    def _fail(self, reason: str) -> None:
        self.status, self.reason, self._model = UNAVAILABLE, reason, None

    def describe(self) -> dict:
        """The facts ``idemrt models info`` prints."""
        return {"id": self.id, "kind": self.kind, "architecture": self.architecture(),
                "file": self.path, "sha256": self.sha256, "source": self.source, "licence": self.licence,
                "status": self.status, **({"reason": self.reason} if self.reason else {})}


@dataclass
class CodecEntry(StoreEntry):
    """An MSE codec: compressai ``codec`` name, ``quality`` (int or null) and, optionally, the
    ``weights_digest`` its bitstreams carry (32 hex digits; checked against the loaded weights)."""

    kind: ClassVar[str] = "codec"
    extra_keys: ClassVar[frozenset] = frozenset({"codec", "quality", "weights_digest"})

    codec: str = ""
    quality: Optional[int] = None
    weights_digest: Optional[str] = None

    @classmethod
    def parse_fields(cls, manifest: dict) -> dict:
        from .models.codec import architecture

        name = _str(manifest, "codec")
        if name == "psc":
            raise StoreError("PSC streams are not served from a store (their weights are a prior)")
        architecture(name)  # CheckpointError naming the known codecs
        quality = manifest.get("quality")
        if quality is not None and (not isinstance(quality, int) or isinstance(quality, bool) or quality < 1):
            raise StoreError(f"quality must be a positive int or null, got {quality!r}")
        digest = manifest.get("weights_digest")
        if digest is not None and (not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest.lower())):
            raise StoreError(f"weights_digest must be 32 hex digits (idemrt models info shows it), got {digest!r}")
        return {"codec": name, "quality": quality, "weights_digest": digest and digest.lower()}

    def architecture(self) -> str:
        from .bitstream import codec_label

        return codec_label(self.codec, self.quality)

    def load(self, device=None):
        from .models.codec_loading import load_codec

        return load_codec(self.codec, quality=self.quality, checkpoint=self.path, sha256=self.sha256, device=device)

    def check_loaded(self, model) -> None:
        actual = model.weights_hash().hex()
        if self.weights_digest is not None and actual != self.weights_digest:
            raise CheckpointError(f"the weights digest is {actual}, the manifest says {self.weights_digest}")

    def identity(self):
        """What the manifest says this codec decodes (:class:`idemrt.bitstream.CodecIdentity`; the
        digest None when the manifest gives none): no loading."""
        from .bitstream import CodecIdentity

        return CodecIdentity(self.codec, self.quality, self.weights_digest and bytes.fromhex(self.weights_digest))

    def describe(self) -> dict:
        info = super().describe()
        if self._model is not None:
            info["weights_digest"] = self._model.weights_hash().hex()
        elif self.weights_digest:
            info["weights_digest"] = self.weights_digest
        return info


@dataclass
class PriorEntry(StoreEntry):
    """A diffusion prior (ADM UNet): a ``preset`` (``ffhq256``, ``imagenet256``) and/or an explicit
    ``config`` of guided-diffusion ``create_model`` arguments."""

    kind: ClassVar[str] = "prior"
    extra_keys: ClassVar[frozenset] = frozenset({"preset", "config"})

    preset: Optional[str] = None
    config: dict = field(default_factory=dict)

    @classmethod
    def parse_fields(cls, manifest: dict) -> dict:
        from .models.unet_config import unet_config

        preset = _str(manifest, "preset", required=False)
        config = manifest.get("config", {})
        if not isinstance(config, dict):
            raise StoreError(f"config must be an object of create_model arguments, got {config!r}")
        try:
            unet_config(preset, **config)  # unknown presets/arguments, a missing architecture
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"bad UNet architecture: {exc}") from None
        return {"preset": preset, "config": dict(config)}

    def architecture(self) -> str:
        parts = [f"ADM UNet {self.preset}" if self.preset else "ADM UNet"]
        if self.config:
            parts.append(", ".join(f"{k}={v}" for k, v in sorted(self.config.items())))
        return " ".join(parts)

    def load(self, device=None):
        from .models.unet_loading import load_unet

        return load_unet(self.path, self.preset, device=device, sha256=self.sha256, **self.config)


# One row per kind: the manifest's "kind" picks the class.
KINDS: dict[str, type[StoreEntry]] = {cls.kind: cls for cls in (CodecEntry, PriorEntry)}


def _check_no_escape(path: str) -> None:
    """Re-check at use time that a resolved path still is what it was (no symlink swapped in)."""
    if os.path.realpath(path) != path:
        raise StoreError(f"{path} changed into a symbolic link after the store was scanned")


def _weights_path(name: str, folder: str, root: str) -> str:
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise StoreError(f"file {name!r}: an absolute path; a manifest names a file inside its model's folder")
    if any(part == ".." for part in re.split(r"[\\/]", name)):
        raise StoreError(f"file {name!r}: '..' is not allowed; a manifest names a file inside its model's folder")
    resolved = os.path.realpath(os.path.join(folder, name))
    if not _inside(resolved, root):
        raise StoreError(f"file {name!r} leads outside the store (to {resolved}); refused")
    return resolved


class ModelStore:
    """The models of a store directory (see the module docstring).

    Constructing it scans the directory and validates every manifest (invalid ones make an
    unavailable entry with the reason); :meth:`check` hashes the files; :meth:`verify` hashes and
    loads them. Loaded models are cached (thread-safe), on ``device``.
    """

    def __init__(self, root, *, device=None):
        path = os.fspath(root)
        if not os.path.isdir(path):
            raise StoreError(f"model store {path}: not a directory")
        self.root = os.path.realpath(path)
        self.device = device
        self._lock = threading.Lock()
        self.entries: dict[str, StoreEntry] = {}
        self.invalid: dict[str, str] = {}  # folder name -> why it is not a model
        self._scan()

    # --- scanning ---------------------------------------------------------------------------------

    def _scan(self) -> None:
        found: dict[str, list[tuple[str, StoreEntry]]] = {}
        for name in sorted(os.listdir(self.root)):
            folder = os.path.join(self.root, name)
            if not os.path.isdir(folder) or not os.path.lexists(os.path.join(folder, MANIFEST)):
                continue
            try:
                entry = self._read(folder)
            except (StoreError, CheckpointError) as exc:
                self.invalid[name] = str(exc)
                continue
            found.setdefault(entry.id, []).append((name, entry))
        for model_id, holders in found.items():
            if len(holders) == 1:
                self.entries[model_id] = holders[0][1]
                continue
            # An ambiguous id names no model: none of the folders claiming it is used.
            for name, _ in holders:
                self.invalid[name] = (f"duplicate id {model_id!r} (in the folders "
                                      f"{', '.join(n for n, _ in holders)})")

    def _read(self, folder: str) -> StoreEntry:
        real = os.path.realpath(folder)
        if not _inside(real, self.root) or real == self.root:
            raise StoreError(f"the folder is a link leading outside the store (to {real}); refused")
        manifest_path = os.path.realpath(os.path.join(real, MANIFEST))
        if not _inside(manifest_path, real):
            raise StoreError(f"{MANIFEST} is a link leading outside the model's folder; refused")
        try:
            with open(manifest_path, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise StoreError(f"cannot read {MANIFEST}: {exc.strerror}") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise StoreError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{MANIFEST} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"{MANIFEST} must hold a JSON object")
        kind = manifest.get("kind")
        if kind not in KINDS:
            raise StoreError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        return KINDS[kind].from_manifest(manifest, real, self.root)

    # --- checks -----------------------------------------------------------------------------------

    def check(self) -> "ModelStore":
        """Hash every file (status available / unavailable with the reason). Returns self."""
        for entry in self.entries.values():
            if entry.status == UNCHECKED:
                entry.check_file()
        return self

    def verify(self) -> bool:
        """Hash and load every model; True if all are available and no manifest is invalid."""
        with self._lock:
            results = [entry.verify(self.device) for entry in self.entries.values()]
        return all(results) and not self.invalid

    def rows(self) -> list[dict]:
        """Every model and every invalid folder, as ``{id, kind, architecture, status, reason}``."""
        rows = [{"id": e.id, "kind": e.kind, "architecture": e.architecture(), "status": e.status,
                 "reason": e.reason} for e in self.entries.values()]
        rows += [{"id": name, "kind": "?", "architecture": "?", "status": UNAVAILABLE,
                  "reason": f"invalid {MANIFEST}: {why}"} for name, why in self.invalid.items()]
        return sorted(rows, key=lambda r: r["id"])

    # --- look-ups ---------------------------------------------------------------------------------

    def entry(self, model_id: str) -> StoreEntry:
        try:
            return self.entries[model_id]
        except (KeyError, TypeError):
            raise ModelNotFoundError(f"no model {model_id!r} in the store {self.root}; it has: "
                                     f"{', '.join(self.entries) or 'nothing'}", model_id=model_id) from None

    def of_kind(self, kind: str) -> list[StoreEntry]:
        return [e for e in self.entries.values() if e.kind == kind]

    def prior(self, model_id: str):
        """The loaded UNet of prior ``model_id`` (ModelNotFoundError if the store has no such prior)."""
        model_id = choose_prior([e.id for e in self.of_kind(PriorEntry.kind)], model_id, where=f"the store {self.root}")
        with self._lock:
            return self.entries[model_id].get(self.device)

    def codec_for(self, bs):
        """The loaded codec that made bitstream ``bs`` (an :class:`idemrt.bitstream.Bitstream` or its
        bytes): same codec name, quality and weights digest (:func:`idemrt.bitstream.route`).
        ModelNotFoundError naming them if none."""
        from . import bitstream as bsfmt

        if not isinstance(bs, bsfmt.Bitstream):
            bs = bsfmt.unpack(bytes(bs))
        where = f"the store {self.root}"
        with self._lock:
            # Route on what the manifests say, then on each candidate's loaded weights: a candidate
            # that does not load, or whose weights are not the stream's, leaves the candidates.
            candidates = {e.id: e.identity() for e in self.of_kind(CodecEntry.kind) if e.status != UNAVAILABLE}
            loaded: dict = {}
            while True:
                entry_id = bsfmt.route(bs, candidates, where=where, store=True)
                if entry_id in loaded:
                    return loaded[entry_id]
                try:
                    loaded[entry_id] = self.entries[entry_id].get(self.device)
                except CheckpointError:
                    del candidates[entry_id]
                    continue
                candidates[entry_id] = bsfmt.CodecIdentity.of(loaded[entry_id])


def choose_prior(priors, requested: Optional[str], default: Optional[str] = None, *,
                 where: str = "this server") -> Optional[str]:
    """Which prior serves a request: the id it asks for (``requested``), else the ``default``
    (a server's configured one), else the only one of ``priors`` (ids; None is the one prior of a
    server without a store). The one place this is decided (a service's engine, ``idemrt
    decompress --models``, :meth:`ModelStore.prior`); ModelNotFoundError naming ``where``'s priors
    when the choice is not among them."""
    priors = list(priors)
    chosen = requested if requested is not None else default
    if chosen is None and len(priors) == 1:
        chosen = priors[0]
    if chosen in priors:
        return chosen
    known = ", ".join(str(p) for p in priors if p is not None) or "none"
    if requested is not None:
        what = f"no prior {str(requested)[:40]!r}"
    elif default is not None:
        what = f"the default prior {default!r} is unavailable"
    else:
        what = "choose one with prior=ID"
    raise ModelNotFoundError(f"{what}; {where}'s priors: {known}", model_id=requested)
