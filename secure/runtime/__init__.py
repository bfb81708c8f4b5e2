"""Run compiled graphs: the interpreter over any backend, the client's inputs on their way
to the parties, end-to-end helpers, breakdown tables.
"""
