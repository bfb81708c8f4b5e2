"""CKKS backend (TenSEAL's SEAL bindings): the polynomial forms on encrypted tensors.

* :mod:`secure.he.params` -- parameter sets at 128-bit security and Galois elements;
* :mod:`secure.he.engine` -- ciphertext arithmetic with exact scale management (SEAL),
  and a ghost engine that only counts levels (the planner);
* :mod:`secure.he.layout` -- how a logical tensor lies in ciphertext slots;
* :mod:`secure.he.ops` -- :class:`HeOps`, the secure-form interface over ciphertexts:
  layout of results and element-wise work;
* :mod:`secure.he.linear` -- arithmetic across slots: linear layers (baby-step giant-step),
  ciphertext matrix products, column sums;
* :mod:`secure.he.refresh` -- one query's trips through the client: masked refreshes,
  re-layouts, bounds, the outputs' finishing and flooding;
* :mod:`secure.he.client` -- the client's side: keys, encryption, refreshes, decryption;
* :mod:`secure.he.pool` -- worker processes: the server's linear layers split between
  them, the client's refresh decryptions and encryptions;
* :mod:`secure.he.plain_cache` -- encoded weight diagonals kept between queries;
* :mod:`secure.runtime.he_planner` -- depth, parameters and rotation keys before running (HeOps on
  level counters, with a level-counting refresh session);
* :mod:`secure.he.breakdown` -- per-node spans and the CKKS operation table.

A whole graph under CKKS in one process is :func:`secure.runtime.execute_he.run_he`; the wire
format of an HE query is :mod:`secure.transport.he_wire`.
"""
