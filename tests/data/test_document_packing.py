"""Document-packed chunks: positions restart per document, nothing is predicted across documents, and the model
attends inside each document only, so a packed batch gives each document's own loss and logits."""

import pytest
import torch

from tunelab.config import RunConfig
from tunelab.data import collate, forward_inputs, pack
from tunelab.data.formats import IGNORE_INDEX
from tunelab.errors import ConfigError
from tunelab.train.loss import batch_loss_sum

DOCS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


def _examples(docs=DOCS):
    return [{"input_ids": list(d), "labels": list(d)} for d in docs]


def test_pack_restarts_positions_and_masks_each_documents_first_label():
    chunks = pack(_examples(), 6, documents=True)
    assert [c["input_ids"] for c in chunks] == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    assert [c["position_ids"] for c in chunks] == [[0, 1, 2, 3, 0, 1], [2, 0, 1, 2, 3, 4]]
    assert chunks[0]["labels"] == [IGNORE_INDEX, 6, 7, 8, IGNORE_INDEX, 10]
    assert chunks[1]["labels"] == [11, IGNORE_INDEX, 13, 14, 15, 16]
    plain = pack(_examples(), 6)
    assert "position_ids" not in plain[0] and plain[0]["labels"] == [5, 6, 7, 8, 9, 10]


def test_collate_pads_positions_by_continuing_the_last_document():
    batch = collate(pack(_examples(), 8, documents=True), pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert set(forward_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert set(forward_inputs(collate(_examples(), pad_id=0))) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_packed_row_gives_each_document_its_own_loss_and_logits(kind, fused, tiny_llama, tiny_gpt2):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind].eval()
    docs = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]
    packed = collate(pack(_examples(docs), 64, documents=True), pad_id=0)
    with torch.no_grad():
        logits = model(**forward_inputs(packed)).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            assert torch.allclose(logits[start:start + len(doc)], alone, atol=1e-5), (kind, doc)
            start += len(doc)
        loss, n = batch_loss_sum(model, packed, "causal-lm", fused=fused)
        separate = [batch_loss_sum(model, collate(_examples([d]), pad_id=0), "causal-lm") for d in docs]
    assert n == sum(k for _, k in separate) == sum(len(d) - 1 for d in docs)
    assert torch.allclose(loss, sum(s for s, _ in separate), atol=1e-4)


def test_packing_mask_resolves_per_method_and_refuses_virtual_token_methods():
    assert RunConfig(packing=True).documents_packed()
    assert not RunConfig(packing=True, packing_mask="none").documents_packed()
    assert not RunConfig(packing=False).documents_packed()
    assert not RunConfig(method="prompt", packing=True).documents_packed()  # unset: where the method allows it
    with pytest.raises(ConfigError, match="packing_mask: document does not apply to method 'prefix'"):
        RunConfig(method="prefix", packing=True, packing_mask="document").documents_packed()


def test_packing_mask_is_a_result_key_only_when_packing():
    assert "packing_mask" not in RunConfig().result_values()
    assert RunConfig(packing=True).result_hash() != RunConfig(packing=True, packing_mask="none").result_hash()
