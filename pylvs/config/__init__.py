"""Configuration files a director reads: keepalived.conf (``keepalived``)
and the data model it produces (``model``)."""
