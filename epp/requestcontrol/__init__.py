"""The request path as a pipeline of named stages, independent of the wire protocol.

`extproc` speaks to Envoy and hands each request to the director
(:class:`~epp.requestcontrol.director.Director`): parse -> rewrite -> objective -> admit
-> candidates -> schedule -> pre-request, then response hooks and one release at the end.
"""
