"""Client library: Publisher, Subscriber, HistoryClient and ControlClient.

Publisher opens a producer session with the writer (`producer_open`: an epoch
and the seq to go on from), connects an XPUB to the proxy's SUB and waits for
the proxy's subscriptions before its first message, so the first message
published right after connecting is not dropped (ZeroMQ's slow joiner). Each
message carries meta with the producer id, the epoch, a sequence, and the
publish time; acknowledgements and nacks come from the writer's notify
endpoint. Subscriber is a SUB on the proxy's PUB (and on the writer's notify
endpoint for "$" topics), and reads stored messages through HistoryClient (the
reader) to catch up or to resume a durable consumer. ControlClient speaks the
request/reply control protocol with a timeout, closing and reopening its REQ
socket after a timeout (the ZeroMQ Guide's Lazy Pirate).
"""

from bus.client.control import ControlClient
from bus.client.errors import BusError, BusTimeout, MessageRefused, ProducerFenced
from bus.client.history import HistoryClient, HistoryPage, since_to_ns
from bus.client.publisher import Publisher, default_producer_id
from bus.client.subscriber import Subscriber
from bus.protocol import Message, ProtocolError

__all__ = ["BusError", "BusTimeout", "ControlClient", "HistoryClient", "HistoryPage", "Message",
           "MessageRefused", "ProducerFenced", "ProtocolError", "Publisher", "Subscriber",
           "default_producer_id", "since_to_ns"]
