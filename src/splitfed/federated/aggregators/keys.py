"""Key agreement, sealed boxes and a keyed PRG for the blind aggregators (X25519, HKDF-SHA256,
AES-256-GCM and ChaCha20 from ``cryptography``).

* :func:`seal` / :func:`open_sealed`: an anonymous sealed box (as libsodium's ``crypto_box_seal``):
  a fresh X25519 key per message agrees with the recipient's public key, HKDF derives an AES-GCM
  key bound to both public keys and a context string, so whoever relays the bytes (the server)
  cannot read or alter them.
* :func:`agree`: the 32-byte secret two parties share from their X25519 keys (SecAgg's pairwise
  seeds and share-encryption keys, Bonawitz et al., 2017), bound to a context string.
* :func:`prg`: a seed expanded into uniform unsigned integers with the ChaCha20 keystream.
"""

from __future__ import annotations

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from splitfed.federated.fedavg import AggregationError

#: Bytes of a raw X25519 public key.
PUBLIC_KEY_BYTES = 32
#: What :func:`seal` adds to the plaintext: the ephemeral public key and the GCM tag.
SEAL_OVERHEAD = PUBLIC_KEY_BYTES + 16
_NONCE = bytes(12)  # every AES-GCM key below encrypts exactly one message


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (what SecAgg secret-shares)."""
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_private(data: bytes) -> X25519PrivateKey:
    """A private key from the 32 raw bytes :func:`private_bytes` gave (kept in a party's own state)."""
    if len(data) != PUBLIC_KEY_BYTES:
        raise AggregationError(f"an X25519 private key has {PUBLIC_KEY_BYTES} bytes, got {len(data)}")
    return X25519PrivateKey.from_private_bytes(data)


def load_public(data: bytes, *, what: str) -> X25519PublicKey:
    """A public key from 32 raw bytes; raises :class:`AggregationError` naming ``what``."""
    if len(data) != PUBLIC_KEY_BYTES:
        raise AggregationError(f"{what}: an X25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(data)


def _derive(shared: bytes, *, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)


def agree(key: X25519PrivateKey, peer_public: bytes, *, info: bytes, what: str) -> bytes:
    """The 32-byte secret ``key`` shares with the owner of ``peer_public``, bound to ``info``.

    Symmetric: both parties derive the same bytes. Raises :class:`AggregationError` for a key
    that is malformed or of low order.
    """
    peer = load_public(peer_public, what=what)
    try:
        shared = key.exchange(peer)
    except ValueError:
        raise AggregationError(f"{what}: the public key is of low order (a forged key)") from None
    mine, theirs = public_bytes(key), peer_public
    salt = b"".join(sorted((mine, theirs)))
    return _derive(shared, salt=salt, info=b"splitfed agree v1|" + info)


def seal(plaintext: bytes, recipient_public: bytes, *, info: bytes) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``recipient_public``'s private key can
    open it, authenticated together with ``info`` (e.g. context id and recipient)."""
    recipient = load_public(recipient_public, what="sealed box recipient")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = public_bytes(ephemeral)
    key = _derive(
        ephemeral.exchange(recipient),
        salt=ephemeral_public + recipient_public,
        info=b"splitfed sealed box v1|" + info,
    )
    return ephemeral_public + AESGCM(key).encrypt(_NONCE, plaintext, info)


def open_sealed(sealed: bytes, key: X25519PrivateKey, *, info: bytes, what: str) -> bytes:
    """Open a :func:`seal`-ed box; raises :class:`AggregationError` if it is not for ``key`` and
    ``info`` or was modified."""
    if len(sealed) < SEAL_OVERHEAD:
        raise AggregationError(f"{what}: {len(sealed)} bytes is shorter than any sealed box")
    ephemeral_public = sealed[:PUBLIC_KEY_BYTES]
    try:
        shared = key.exchange(load_public(ephemeral_public, what=what))
    except ValueError:
        raise AggregationError(f"{what}: the sealed box carries a low-order key (forged)") from None
    aead_key = _derive(
        shared, salt=ephemeral_public + public_bytes(key), info=b"splitfed sealed box v1|" + info
    )
    try:
        return AESGCM(aead_key).decrypt(_NONCE, sealed[PUBLIC_KEY_BYTES:], info)
    except InvalidTag:
        raise AggregationError(
            f"{what}: the sealed box does not open with this client's key (addressed to another "
            "client, for another context or round, or modified in transit)"
        ) from None


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM with a 12-byte nonce unique per key."""
    return AESGCM(key).encrypt(nonce, plaintext, associated)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes, *, what: str) -> bytes:
    """Inverse of :func:`aead_encrypt`; raises :class:`AggregationError` if the bytes were altered."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise AggregationError(
            f"{what}: authentication failed (wrong sender, round or modified bytes)"
        ) from None


def prg(seed: bytes, count: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """``count`` uniform unsigned integers of ``dtype`` (``np.uint32`` or ``np.uint64``) from the
    ChaCha20 keystream of a 32-byte ``seed`` (one seed expands into one stream)."""
    if len(seed) != 32:
        raise ValueError(f"a PRG seed has 32 bytes, got {len(seed)}")
    width = np.dtype(dtype).itemsize
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(count * width))
    return np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)  # a writable copy
