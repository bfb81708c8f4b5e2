"""Three-party replicated secret sharing over Z_2^64: ring and fixed point, CSPRNG
randomness, shares, protocols, the in-process engine and the MPC backend of the form
interface.
"""
