"""CKKS backend (TenSEAL's SEAL bindings): the polynomial forms on encrypted tensors.

* :mod:`secure.he.params` -- parameter sets at 128-bit security and Galois elements;
* :mod:`secure.he.engine` -- ciphertext arithmetic with exact scale management (SEAL),
  and a ghost engine that only counts levels (the planner);
* :mod:`secure.he.layout` -- how a logical tensor lies in ciphertext slots;
* :mod:`secure.he.backend` -- :class:`HeOps`, the secure-form interface over ciphertexts;
* :mod:`secure.he.client` -- the client's side: keys, encryption, refreshes, decryption;
* :mod:`secure.he.planner` -- depth, parameters and rotation keys before running;
* :mod:`secure.he.execute` -- a whole graph under CKKS in one process.
"""
