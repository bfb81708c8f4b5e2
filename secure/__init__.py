"""The secure inference library: fixed-point MPC on replicated shares, CKKS, the graph
compiler and the runtime (layers, lowest first: profile, approx, mpc and he, graph,
runtime, evaluate and distill; transport beside them).
"""
