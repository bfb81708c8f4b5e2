"""How parties and clients exchange tensors: the transport interface, in-process queues,
gRPC peer links and the wire formats.
"""
