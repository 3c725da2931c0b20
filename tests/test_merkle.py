"""RFC 6962 Merkle trees, audit paths, and the offline proof check."""

from __future__ import annotations

import copy
import hashlib

import pytest
from embit import script
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from proofs.merkle import MerkleTree, leaf_hash, node_hash, root_from_path
from anchor.proof import verify_proof
from proofs.document import ProofError, make_proof, op_return_payload, stored_payload

# Certificate Transparency's reference vectors (RFC 6962 test data): the roots
# of the trees over the first n of these 8 leaves.
CT_LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43",
             bytes(range(0x50, 0x58)), bytes(range(0x60, 0x70))]
CT_ROOTS = ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]


def rfc6962_root(leaves: list[bytes]) -> bytes:
    """MTH as RFC 6962 2.1 defines it, recursively."""
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)  # largest power of two below n
    return node_hash(rfc6962_root(leaves[:k]), rfc6962_root(leaves[k:]))


def docs(n: int) -> list[bytes]:
    return [hashlib.sha256(b"doc %d" % i).digest() for i in range(n)]


@pytest.mark.parametrize("n", range(1, 9))
def test_roots_match_the_certificate_transparency_vectors(n: int) -> None:
    assert MerkleTree(CT_LEAVES[:n]).root.hex() == CT_ROOTS[n - 1]


def test_every_size_matches_rfc6962_and_every_path_verifies() -> None:
    for n in list(range(1, 70)) + [1000, 1023, 1025]:
        leaves = docs(n)
        tree = MerkleTree(leaves)
        assert tree.root == rfc6962_root(leaves), n
        for i in (range(n) if n < 70 else (0, 1, n // 2, n - 2, n - 1)):
            path = tree.path(i)
            assert len(path) <= (n - 1).bit_length()
            assert root_from_path(leaves[i], i, n, path) == tree.root, (n, i)


def test_a_wrong_leaf_index_size_or_sibling_does_not_verify() -> None:
    leaves = docs(11)
    tree = MerkleTree(leaves)
    path = tree.path(6)
    assert root_from_path(leaves[6], 6, 11, path) == tree.root
    assert root_from_path(leaves[6], 7, 11, path) != tree.root
    assert root_from_path(leaves[5], 6, 11, path) != tree.root
    tampered = path[:1] + [bytes(32)] + path[2:]
    assert root_from_path(leaves[6], 6, 11, tampered) != tree.root
    with pytest.raises(ValueError):
        root_from_path(leaves[6], 6, 11, path + [bytes(32)])   # longer than the tree is deep
    with pytest.raises(ValueError):
        root_from_path(leaves[6], 6, 11, path[:-1])            # shorter
    with pytest.raises(ValueError):
        root_from_path(leaves[6], 11, 11, path)                # index outside the tree


def anchor_tx(root: bytes, size: int, extra_op_return: bool = False,
              payload: bytes | None = None) -> Transaction:
    data = payload or op_return_payload(root, size)
    outs = [TransactionOutput(0, script.Script(bytes([0x6a, len(data)]) + data)),
            TransactionOutput(50_000, script.Script(bytes.fromhex("0014" + "11" * 20)))]
    if extra_op_return:
        outs.append(TransactionOutput(0, script.Script(b"\x6a\x01\x00")))
    return Transaction(vin=[TransactionInput(bytes(32), 0)], vout=outs)


def proof_for(index: int = 3, n: int = 10, extra_op_return: bool = False
              ) -> tuple[dict, Transaction]:
    leaves = docs(n)
    tree = MerkleTree(leaves)
    tx = anchor_tx(tree.root, n, extra_op_return)
    anchor = {"root": tree.root, "size": n, "anchor_id": 1, "txid": tx.txid().hex(),
              "replaced_txids": [], "status": "submitted", "block_hash": None,
              "block_height": None, "raw_tx": tx.serialize()}
    return make_proof(leaves[index], index, n, tree.path(index), anchor, "ref"), tx


def test_a_proof_verifies_offline_against_its_transaction() -> None:
    proof, tx = proof_for()
    checked = verify_proof(proof, tx.serialize().hex())
    assert checked["transaction_checked"] and checked["op_return_vout"] == 0
    assert verify_proof(proof)["transaction_checked"] is False


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(document=hashlib.sha256(b"other").hexdigest()), "audit path leads to"),
    (lambda p: p.update(leaf_index=4), "audit path leads to"),
    (lambda p: p["path"].__setitem__(0, "00" * 32), "audit path leads to"),
    (lambda p: p.update(path=p["path"][:-1]), "does not fit the tree"),
    (lambda p: p.update(op_return="00" * 41), "OP_RETURN data does not start with BUSA"),
    (lambda p: p.update(op_return=p["op_return"][:-8] + "00000009"), "a tree of 9 leaves"),
    (lambda p: p.update(root="00" * 32), "audit path leads to"),
    (lambda p: p.update(format="x"), "not a bus-anchor-proof/1"),
    (lambda p: p.update(txid="ab" * 32), "the proof names"),
])
def test_a_tampered_proof_fails_with_the_step_that_failed(change, message) -> None:
    proof, tx = proof_for()
    bad = copy.deepcopy(proof)
    change(bad)
    with pytest.raises(ProofError, match=message):
        verify_proof(bad, tx.serialize().hex())


@pytest.mark.parametrize("proof, message", [
    ([1], "a proof is a JSON object, not list"),
    (None, "a proof is a JSON object, not NoneType"),
    ("proof", "a proof is a JSON object, not str"),
])
def test_a_proof_that_is_not_an_object_is_invalid_not_a_crash(proof, message) -> None:
    with pytest.raises(ProofError, match=message):
        verify_proof(proof)


@pytest.mark.parametrize("path", [None, 7, [1], ["zz"], {"a": "b"}, ["00" * 31], ["00" * 32] * 33])
def test_a_path_of_the_wrong_shape_is_invalid_not_a_crash(path) -> None:
    """"path": null raised TypeError in `anchor verify` (a traceback)."""
    proof, _tx = proof_for()
    proof["path"] = path
    with pytest.raises(ProofError, match="path"):
        verify_proof(proof)


@pytest.mark.parametrize("index, size", [(2**63, 10), (-1, 10), (0, 0), (3, 2**32), (10, 10),
                                         (True, 10), (3, 10.0)])
def test_an_index_or_size_out_of_range_is_invalid_not_a_crash(index, size) -> None:
    proof, tx = proof_for()
    proof.update(leaf_index=index, tree_size=size)
    with pytest.raises(ProofError, match="leaf|integers"):
        verify_proof(proof, tx.serialize().hex())


def test_the_tree_size_is_bound_by_the_op_return_and_old_anchors_still_verify() -> None:
    """A root-only OP_RETURN binds no size: leaf 0 of 8 has the same path shape
    as leaf 0 of 5, so a proof could claim either. Version 2 commits the size."""
    leaves = docs(8)
    tree = MerkleTree(leaves)
    proof, tx = proof_for(index=0, n=8)
    proof["tree_size"] = 5
    with pytest.raises(ProofError, match="commits to a tree of 8 leaves, the proof says 5"):
        verify_proof(proof, tx.serialize().hex())
    # An anchor made before (version 1: BUSA 0x01 root): its proofs verify,
    # and say that the size is not the chain's; its fee bumps keep that data.
    old_data = b"BUSA\x01" + tree.root
    old_tx = anchor_tx(tree.root, 8, payload=old_data)
    anchor = {"root": tree.root, "size": 8, "anchor_id": 1, "txid": old_tx.txid().hex(),
              "replaced_txids": [], "status": "submitted", "block_hash": None,
              "block_height": None, "raw_tx": old_tx.serialize()}
    assert stored_payload(anchor) == old_data
    old = make_proof(leaves[0], 0, 8, tree.path(0), anchor)
    old["tree_size"] = 5
    checked = verify_proof(old, old_tx.serialize().hex())
    assert checked["transaction_checked"] and checked["size_committed"] is False


def test_a_transaction_with_two_op_returns_is_refused() -> None:
    proof, tx = proof_for(extra_op_return=True)
    with pytest.raises(ProofError, match="2 OP_RETURN outputs"):
        verify_proof(proof, tx.serialize().hex())
