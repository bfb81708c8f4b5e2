"""The client side of the service: the MPC and HE SDKs, the command line and the main job
(it imports the party package's configuration and launcher, never its nodes).
"""
