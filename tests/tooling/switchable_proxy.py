"""A TCP proxy that can be switched off: the tests put it in front of the local cluster's S3 server
(`local-cluster start --s3-endpoint`), so that an S3 outage can be rehearsed without losing the server's
contents (moto keeps them in memory). `python -I switchable_proxy.py LISTEN_PORT TARGET_PORT`; SIGUSR1 takes it
down (its open connections cut, new ones refused, as an unreachable endpoint), SIGUSR2 brings it back."""
import asyncio
import signal
import sys


async def serve(listen_port, target_port):
    server, connections = None, set()

    async def pipe(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        pair = {client_writer, target_writer}
        connections.update(pair)
        await asyncio.gather(pipe(client_reader, target_writer), pipe(target_reader, client_writer))
        connections.difference_update(pair)

    async def up():
        nonlocal server
        if server is None:
            server = await asyncio.start_server(handle, "127.0.0.1", listen_port, reuse_address=True)

    def down():
        nonlocal server
        if server is not None:
            server.close()
            server = None
        for writer in list(connections):
            writer.transport.abort()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, down)
    loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(up()))
    await up()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
