"""Federated LoRA on Flower (flwr 1.41): a ``ServerApp`` and a ``ClientApp`` that run the same client
update, encryption and aggregation code as ``splitfed fedtrain``, carrying ciphertexts in Flower
messages. ``examples/flower/`` is the Flower app that points at them (``flwr run examples/flower``).
"""
