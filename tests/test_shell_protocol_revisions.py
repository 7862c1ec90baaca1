"""What differs between subnet revisions is configuration: the synapse set and `model_url`.

`ImageSynapse` itself never changes (its fields are pinned in test_shell_axon.py); whether the
`ExtendedImageSynapse` route is served, and what `model_url` it returns, come from `miner:`.
"""

import bittensor as bt
import pytest
from PIL import Image

from cascade.config import parse_cascade_config
from natix_miner.neuron import BackgroundMiner, Miner, NeuronOptions
from natix_miner.protocol import ExtendedImageSynapse, ImageSynapse
from natix_miner.settings import parse_miner_settings
from natix_miner.toolkit.challenge import encode_jpeg_b64

URL = "https://huggingface.co/someone/roadwork-model"


def _cascade(tmp_path):
    return parse_cascade_config({"artifacts_dir": str(tmp_path / "artifacts"),
                                 "engine": {"deadline_ms": 4000},
                                 "tiers": [{"name": "hazard_cues.handset", "backend": "hazard_cues",
                                            "expected_latency_ms": 25}]},
                                source="<test>", base_dir=str(tmp_path))


async def _ask(miner, wallet, synapse):
    host, port = miner.address.rsplit(":", 1)
    target = bt.AxonInfo(version=0, ip=host, port=int(port), ip_type=4, hotkey=miner.hotkey, coldkey="")
    dendrite = bt.Dendrite(wallet=wallet)
    try:
        return await dendrite(target, synapse, timeout=9, deserialize=False)
    finally:
        await dendrite.aclose_session()


@pytest.mark.parametrize("extended", [True, False])
async def test_synapse_set_and_model_url_come_from_the_miner_section(tmp_path, free_port, make_wallet,
                                                                    extended):
    validator = make_wallet("validator")
    settings = parse_miner_settings({"extended_synapse": extended, "model_url": URL}, source="m.yaml")
    opts = NeuronOptions(netuid=72, axon_port=free_port, local=True,
                         allow_hotkeys=(validator.hotkey.ss58_address,), rate_limit_per_minute=0)
    miner = Miner(settings, _cascade(tmp_path), opts)
    image = encode_jpeg_b64(Image.new("RGB", (64, 48), (120, 120, 120)))
    with BackgroundMiner(miner):
        plain = await _ask(miner, validator, ImageSynapse(image=image))
        ext = await _ask(miner, validator, ExtendedImageSynapse(image=image))
    assert plain.dendrite.status_code == 200 and 0.0 <= plain.prediction <= 1.0
    if extended:
        assert ext.dendrite.status_code == 200 and ext.model_url == URL
    else:   # the route does not exist: the answer is the synapse's default, never a prediction
        assert ext.dendrite.status_code != 200 and ext.prediction == -1.0 and ext.model_url == ""
