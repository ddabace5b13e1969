"""The client side: Flower's ClientApp and one site's work in a round.

``app``: the ClientApp (Message glue); ``round``: a round of local training or
evaluation, independent of Flower; ``private_round``: the DP-SGD round and the
client's privacy ledger; ``site``: per-site settings from Flower's node-config;
``she``: SHE-LoRA's client glue (decrypt the merged columns, seal the reply).
"""
