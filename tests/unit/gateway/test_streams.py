"""The count of open streaming calls per caller (services/gateway/streams.py) as logic: the limit, giving a slot
back (once, however often it is closed), the message a refused caller reads, and how a caller's address is read
from gRPC's and the web front's peer strings."""

import grpc
import pytest

from modelgrid.client.errors import ResourceExhausted
from services.gateway.streams import SETTING, OpenStreams, peer_host
from services.kit.interceptors import status_of


def test_a_caller_holds_at_most_the_limit_and_a_closed_slot_is_given_back_once():
    streams = OpenStreams(2)
    first, second = streams.open("key:a", "API key 'a'"), streams.open("key:a", "API key 'a'")
    other = streams.open("key:b", "API key 'b'")  # another caller has slots of its own
    assert (streams.held("key:a"), streams.held("key:b"), streams.total) == (2, 1, 3)
    with pytest.raises(ResourceExhausted) as refused:
        streams.open("key:a", "API key 'a'")
    assert status_of(refused.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = str(refused.value)
    assert "API key 'a'" in message and "2 streaming calls open" in message and SETTING in message
    first.close()
    first.close()  # the done callback and the handler's end both close it: one slot comes back, not two
    assert streams.held("key:a") == 1
    with streams.open("key:a", "API key 'a'"):
        assert streams.held("key:a") == 2
    second.close()
    other.close()
    assert (streams.held("key:a"), streams.total) == (0, 0)


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:51234", "127.0.0.1"),
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:%5B::1%5D:51234", "::1"),
        ("127.0.0.1", "127.0.0.1"),  # the web front's ASGI client address
        ("::1", "::1"),
        ("198.18.1.2:80", "198.18.1.2"),
        ("unix:/run/gw.sock", "unix:/run/gw.sock"),
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_a_caller_is_its_address_without_the_port(peer, host):
    assert peer_host(peer) == host
