"""Everything about the adapter itself, shared by clients and the server.

``state``: adapter tensors in and out of a PEFT model and onto the wire;
``rank``: all low-rank math (LoRA scale, zero-padding, truncation, SVD to factors,
product means); ``variants``: the local update rules (lora, ffa, la_lora, rolora):
which factors are trained, sent and merged; ``residual``: FLoRA's frozen
full-precision delta beside the base; ``pissa`` and ``loftq``: the SVD
initialisations (PiSSA's residual base, LoftQ's factors), the same at every site.
DoRA and VeRA are peft's (``fedlora.models.wrap_lora``); ``state`` says which of
their tensors is scheduled as A or B and which never travels.
"""
