"""The actor's concurrency: renders one at a time in ticket order while commits overlap them."""

import threading
import time

from kandinsky_batch.worker import Turnstile


def test_turnstile_serves_tickets_in_order_whatever_order_threads_arrive():
    turnstile, order, inside = Turnstile(), [], []

    def call(ticket):
        with turnstile.turn(ticket):
            inside.append(ticket)
            assert len(inside) == 1, "two renders at once"
            time.sleep(0.01)
            order.append(ticket)
            inside.remove(ticket)

    threads = [threading.Thread(target=call, args=(t,)) for t in (3, 1, 0, 4, 2)]
    for thread in threads:
        thread.start()
        time.sleep(0.005)  # arrive out of order on purpose
    for thread in threads:
        thread.join(timeout=10)
    assert order == [0, 1, 2, 3, 4]


def test_a_failed_render_still_lets_the_next_ticket_through():
    turnstile = Turnstile()
    try:
        with turnstile.turn(0):
            raise RuntimeError("render failed")
    except RuntimeError:
        pass
    done = threading.Event()
    thread = threading.Thread(target=lambda: turnstile.turn(1).__enter__() and None or done.set())
    thread.start()
    thread.join(timeout=5)
    assert done.is_set()
