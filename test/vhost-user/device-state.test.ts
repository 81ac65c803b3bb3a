/**
 * Device-state transfer (DEVICE_STATE: SET_DEVICE_STATE_FD + CHECK_DEVICE_STATE) between two
 * back-ends through the vmshift front-end: the state one back-end saves is what the other
 * loads; a state the device refuses is a NACK at CHECK_DEVICE_STATE and the back-end goes on.
 */
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { VhostUserError } from "../../src/vhost-user/protocol/errors.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { countFds } from "../helpers/proc.js";
import { statefulDevice } from "../helpers/stateful-device.js";

const MiB = 1 << 20;
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);

async function backend(name: string) {
  const device = statefulDevice();
  const path = join(tmpdir(), `vmshift-state-${process.pid}-${name}.sock`);
  const daemon = VhostUserDaemon.listen(device, path);
  const serving = daemon.serve();
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
  const fe = VhostUserFrontend.connect(path, { timeoutMs: 5000 });
  const q = SplitQueueDriver.at(memory, 0x1000, 64, { features: VERSION_1 });
  await fe.start({ memory, features: VERSION_1, rings: [q.layout] });
  const echo = async (n: number) => {
    for (let i = 0; i < n; i++) {
      memory.write(0x100000, Uint8Array.of(i, 1, 2));
      q.add([{ addr: 0x100000, len: 3 }], [{ addr: 0x200000, len: 3 }]);
      if (q.publish()) fe.kick(0);
      for (;;) {
        const since = fe.vring(0).calls;
        if (q.getUsed()) break;
        if (q.enableInterrupts()) continue;
        await fe.waitCall(0, { since, timeoutMs: 5000 });
      }
    }
  };
  return {
    device,
    fe,
    echo,
    async close() {
      fe.close();
      await daemon.close();
      await serving;
      memory.close();
    },
  };
}

test("a device's state saved on one back-end loads into another; a refused state is a NACK", async () => {
  const fds = countFds();
  const a = await backend("a");
  const b = await backend("b");
  try {
    assert.ok(a.fe.hasProtocolFeature(ProtocolFeature.DEVICE_STATE), "DEVICE_STATE negotiated");
    await a.echo(5);
    assert.equal(a.device.served, 5);
    // Migration order: the rings stop, then the state is saved.
    await a.fe.stopVring(0);
    const state = await a.fe.saveDeviceState();
    assert.equal(state.byteLength, 12);
    await b.fe.loadDeviceState(state);
    assert.equal(b.device.served, 5, "the count travelled");
    await b.echo(2);
    assert.equal(b.device.served, 7, "and goes on from there");
    // A blob the device does not take: the transfer itself works, CHECK_DEVICE_STATE says no.
    await assert.rejects(b.fe.loadDeviceState(Uint8Array.of(1, 2, 3)), (e: unknown) => {
      assert.ok(e instanceof VhostUserError && e.code === "NACK", String(e));
      return true;
    });
    assert.equal(b.device.served, 7, "state unchanged");
    await b.echo(1);
    assert.equal(b.device.served, 8, "the back-end goes on");
  } finally {
    await a.close();
    await b.close();
  }
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(countFds(), fds, "no fd left behind (socket pairs, state streams)");
});
