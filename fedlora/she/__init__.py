"""SHE-LoRA building blocks shared by clients and the server.

``keys``: CKKS contexts (secret for the clients, public for the server) and their
identity; ``columns``: column sensitivity, nested negotiation and swapping (pure
math); ``packing``: encrypting the selected columns of a client's update, adding
ciphertexts on the server and decrypting them on a client; ``updates``: a client's
part (column scores, the encrypted upload, rebuilding the merged update). The
ClientApp glue is ``fedlora.client.she``; the server strategy is
``strategies.she_lora``.
"""
