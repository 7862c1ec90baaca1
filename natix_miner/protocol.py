"""The SN72 wire format: `ImageSynapse`, field for field as the subnet's validators send it.

The axon route is named after the class, so the class name is part of the protocol; so are the
three field names, their types and their defaults (SN72_PROTOCOL.md, "Wire format"). A validator
reads `response.prediction`; -1.0 (the default) counts as no answer.
"""

import bittensor as bt


class ImageSynapse(bt.Synapse):
    """One challenge: a base64 JPEG in, a roadwork probability in [0, 1] out."""

    # Base64 of the JPEG bytes of the challenge image; the miner clears it in its reply.
    image: str = ""
    # The miner's probability that the image shows roadwork; -1.0 means "no answer".
    prediction: float = -1.0
    # Ground truth on testnets only; validators on mainnet never set it.
    testnet_label: int = -1

    def deserialize(self) -> float:
        """What `dendrite(..., deserialize=True)` returns: the prediction."""
        return self.prediction


class ExtendedImageSynapse(ImageSynapse):
    """The same challenge under the route (and two extra fields) of the subnet revisions whose
    validators build it with `prepare_synapse` (public streetvision-subnet code: the validator
    sends `ExtendedImageSynapse` and reads `model_url` back). Served beside `ImageSynapse` when
    `miner.extended_synapse` is true, by the same guard and forward."""

    # The miner's model (Hugging Face repo URL); validators of that revision log it.
    model_url: str = ""
    # Free-text reason for a roadwork answer (asked for by one revision; empty when unknown).
    explanation: str = ""


def synapse_class(base: type, hash_fields: "tuple[str, ...] | list[str]" = ()) -> type:
    """`base`, or a subclass of the same name (so the same route) whose signature covers
    `hash_fields` (`required_hash_fields`): the revision setting `miner.synapse_hash_fields`.

    SN72's validators send `ImageSynapse` with no hashed fields, so the default is `base` itself;
    a miner that demanded a hashed image alone would see every body hash mismatch."""
    fields = tuple(hash_fields)
    if not fields:
        return base
    unknown = [f for f in fields if f not in base.model_fields]
    if unknown:
        raise ValueError(f"{base.__name__} has no field(s) {unknown} to hash")
    return type(base.__name__, (base,), {"required_hash_fields": fields,
                                         "__module__": base.__module__,
                                         "__doc__": base.__doc__})
