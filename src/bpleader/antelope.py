"""Antelope transactions on the wire: the ``eosio::actfinkey`` the agent signs, and the
checks the simulator applies to what it receives.

Serialization and K1 signatures come from ``pyo3-antelope-rs`` (``antelope_rs``, Rust):
its signatures and packed transactions are byte for byte those of the reference
library ``@wharfkit/antelope``. Public key recovery, which only the simulator needs,
comes from ``coincurve`` (libsecp256k1, the library nodeos recovers keys with). The ABI
below is data, not code: the standard transaction layout and the one action we send.
Both libraries are imported on first use, so an agent that switches keys with
``finalizer.switch_command`` never loads them (they are the optional ``savanna`` extra).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any

BLS_PREFIX = "PUB_BLS_"
BLS_KEY_BYTES = 96
SYSTEM = "eosio"
ACTFINKEY = "actfinkey"
# A transaction expires this long after the head it was built on (nodeos allows 1 hour).
DEFAULT_EXPIRATION = 60

_ABI = {
    "version": "eosio::abi/1.2", "types": [],
    "structs": [
        {"name": "permission_level", "base": "", "fields": [
            {"name": "actor", "type": "name"}, {"name": "permission", "type": "name"}]},
        {"name": "action", "base": "", "fields": [
            {"name": "account", "type": "name"}, {"name": "name", "type": "name"},
            {"name": "authorization", "type": "permission_level[]"},
            {"name": "data", "type": "bytes"}]},
        {"name": "extension", "base": "", "fields": [
            {"name": "type", "type": "uint16"}, {"name": "data", "type": "bytes"}]},
        {"name": "transaction", "base": "", "fields": [
            {"name": "expiration", "type": "time_point_sec"},
            {"name": "ref_block_num", "type": "uint16"},
            {"name": "ref_block_prefix", "type": "uint32"},
            {"name": "max_net_usage_words", "type": "varuint32"},
            {"name": "max_cpu_usage_ms", "type": "uint8"},
            {"name": "delay_sec", "type": "varuint32"},
            {"name": "context_free_actions", "type": "action[]"},
            {"name": "actions", "type": "action[]"},
            {"name": "transaction_extensions", "type": "extension[]"}]},
        {"name": ACTFINKEY, "base": "", "fields": [
            {"name": "finalizer_name", "type": "name"},
            {"name": "finalizer_key", "type": "string"}]}],
    "actions": [{"name": ACTFINKEY, "type": ACTFINKEY, "ricardian_contract": ""}],
    "tables": [], "ricardian_clauses": [], "error_messages": [], "abi_extensions": [],
    "variants": [], "action_results": []}


def _ripemd160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", data).digest()


def encode_bls_public_key(raw: bytes) -> str:
    """``PUB_BLS_`` + base64url without padding of the 96 key bytes and 4 check bytes
    (the first 4 of RIPEMD-160 over the key), as Spring's fc library writes it."""
    if len(raw) != BLS_KEY_BYTES:
        raise ValueError(f"a BLS public key has {BLS_KEY_BYTES} bytes, not {len(raw)}")
    text = base64.urlsafe_b64encode(raw + _ripemd160(raw)[:4]).decode().rstrip("=")
    return BLS_PREFIX + text


def decode_bls_public_key(text: str) -> bytes:
    """The 96 key bytes of a ``PUB_BLS_`` key; ValueError saying what is wrong."""
    if not text.startswith(BLS_PREFIX):
        raise ValueError(f"must start with {BLS_PREFIX}")
    body = text[len(BLS_PREFIX):].rstrip("=")
    try:
        data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, TypeError):
        raise ValueError("is not base64url") from None
    if len(data) != BLS_KEY_BYTES + 4:
        raise ValueError(f"decodes to {len(data)} bytes, not {BLS_KEY_BYTES} + 4 checksum")
    raw, check = data[:BLS_KEY_BYTES], data[BLS_KEY_BYTES:]
    if _ripemd160(raw)[:4] != check:
        raise ValueError("checksum does not match (a typo or a truncated key)")
    return raw


class TransactionError(ValueError):
    """A key, signature or packed transaction that cannot be read."""


@cache
def _abi() -> Any:
    from antelope_rs import ABI

    return ABI.from_str(json.dumps(_ABI))


def tapos(block_id: str) -> tuple[int, int]:
    """``ref_block_num`` and ``ref_block_prefix`` of a block id, as nodeos checks them."""
    raw = bytes.fromhex(block_id)
    return int.from_bytes(raw[0:4], "big") & 0xFFFF, int.from_bytes(raw[8:12], "little")


def public_key_of(private_key: str) -> str:
    """The ``PUB_K1_`` key of a K1 private key (``PVT_K1_`` or legacy WIF ``5...``)."""
    from antelope_rs import PrivateKey

    try:
        return str(PrivateKey.from_str(private_key.strip()).get_public())
    except ValueError as exc:
        raise TransactionError(f"not a K1 private key ({exc})") from None


def normalize_public_key(key: str) -> str:
    """One spelling (``PUB_K1_``) for a K1 public key written ``EOS...`` or ``PUB_K1_...``."""
    from antelope_rs import PublicKey

    try:
        return str(PublicKey.from_str(key.strip()))
    except ValueError as exc:
        raise TransactionError(f"not a K1 public key ({exc})") from None


def new_private_key(seed: bytes | None = None) -> str:
    """A fresh K1 private key (``PVT_K1_``); from ``seed`` it is always the same one
    (the deterministic simulation needs keys that replay)."""
    from antelope_rs import PrivateKey

    if seed is None:
        return str(PrivateKey.random(0))
    return str(PrivateKey.from_bytes(b"\x00" + hashlib.sha256(seed).digest()))


def sign_actfinkey(chain_id: str, ref_block_id: str, expiration: int, private_key: str,
                   finalizer: str, permission: str, bls_key: str) -> dict[str, Any]:
    """The push_transaction body of ``eosio::actfinkey(finalizer, bls_key)`` signed by
    ``finalizer@permission``'s key, valid until ``expiration`` (seconds since the epoch)."""
    from antelope_rs import PrivateKey, sign_tx

    ref_num, ref_prefix = tapos(ref_block_id)
    data = _abi().pack(ACTFINKEY, {"finalizer_name": finalizer, "finalizer_key": bls_key})
    header = SimpleNamespace(expiration=expiration, ref_block_num=ref_num,
                             ref_block_prefix=ref_prefix, max_net_usage_words=0,
                             max_cpu_usage_ms=0, delay_sec=0)
    action = SimpleNamespace(account=SYSTEM, name=ACTFINKEY, data=data, authorization=[
        SimpleNamespace(actor=finalizer, permission=permission)])
    try:
        key = PrivateKey.from_str(private_key.strip())
    except ValueError as exc:
        raise TransactionError(f"not a K1 private key ({exc})") from None
    body: dict[str, Any] = sign_tx(bytes.fromhex(chain_id), header, [action], key)
    body["compression"] = 0
    return dict(body)


@dataclass(frozen=True)
class Action:
    account: str
    name: str
    authorization: tuple[tuple[str, str], ...]  # (actor, permission)
    data: dict[str, str] | None  # actfinkey's fields; None for any other action


@dataclass(frozen=True)
class SignedTransaction:
    """A received transaction, unpacked, with the public keys that signed it."""

    id: str
    expiration: int  # seconds since the epoch
    ref_block_num: int
    ref_block_prefix: int
    actions: tuple[Action, ...]
    signing_keys: tuple[str, ...]  # PUB_K1_..., in signature order

    @property
    def expiration_ms(self) -> int:
        return self.expiration * 1000


def _recover(signature: str, digest: bytes) -> str:
    import coincurve
    from antelope_rs import PublicKey, Signature

    raw = Signature.from_str(signature).encode()  # [type][v][r:32][s:32]
    if raw[0] != 0:
        raise TransactionError("only K1 signatures are supported")
    recid = (raw[1] - 27) & 3  # v is 27..34, as fc reads it
    point = coincurve.PublicKey.from_signature_and_message(raw[2:66] + bytes([recid]),
                                                           digest, hasher=None)
    return str(PublicKey.from_bytes(b"\x00" + point.format(compressed=True)))


def decode_transaction(body: dict[str, Any], chain_id: str) -> SignedTransaction:
    """Unpack a push_transaction body and recover its signers; TransactionError if any
    part is unreadable (nodeos answers those with 3010010 or a 400)."""
    try:
        packed = bytes.fromhex(str(body.get("packed_trx", "")))
        cfd = bytes.fromhex(str(body.get("packed_context_free_data") or ""))
        signatures = body.get("signatures")
        if not isinstance(signatures, list) or not all(isinstance(s, str) for s in signatures):
            raise TransactionError("signatures must be a list of strings")
        if body.get("compression", 0) not in (0, "none"):
            raise TransactionError("only uncompressed transactions are supported")
        trx = _abi().unpack("transaction", packed)
        actions = []
        for a in trx["actions"]:
            account, name = str(a["account"]), str(a["name"])
            data = None
            if (account, name) == (SYSTEM, ACTFINKEY):
                data = {k: str(v) for k, v in _abi().unpack(ACTFINKEY, a["data"]).items()}
            auth = tuple((str(p["actor"]), str(p["permission"])) for p in a["authorization"])
            actions.append(Action(account, name, auth, data))
        digest = hashlib.sha256(bytes.fromhex(chain_id) + packed +
                                (hashlib.sha256(cfd).digest() if cfd else bytes(32))).digest()
        keys = tuple(_recover(s, digest) for s in signatures)
    except TransactionError:
        raise
    except Exception as exc:  # the libraries raise ValueError, KeyError, their own errors
        raise TransactionError(f"{type(exc).__name__}: {str(exc)[:160]}") from None
    return SignedTransaction(hashlib.sha256(packed).hexdigest(), int(trx["expiration"]),
                             int(trx["ref_block_num"]), int(trx["ref_block_prefix"]),
                             tuple(actions), keys)
