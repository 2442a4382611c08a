// Reply audio, played gap-free from a queue of chunks; counts what it actually played.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = []; // [{turn, samples: Float32Array}]
    this.offset = 0; // into chunks[0]
    this.played = 0; // every sample played, all turns
    this.playedByTurn = new Map();
    this.sinceReport = 0;
    this.port.onmessage = (event) => this.command(event.data);
  }

  command(message) {
    if (message.type === "audio") {
      this.chunks.push({ turn: message.turn, samples: message.samples });
    } else if (message.type === "flush") {
      // Interrupted: drop what is queued, and say how much of the turn was heard.
      this.chunks = [];
      this.offset = 0;
      this.report("flushed", message.turn);
    }
  }

  report(type, turn) {
    this.port.postMessage({
      type,
      turn,
      played: this.played,
      playedByTurn: Object.fromEntries(this.playedByTurn),
      queued: this.chunks.reduce((n, c) => n + c.samples.length, 0) - this.offset,
    });
    this.sinceReport = 0;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    while (written < out.length && this.chunks.length) {
      const chunk = this.chunks[0];
      const take = Math.min(out.length - written, chunk.samples.length - this.offset);
      out.set(chunk.samples.subarray(this.offset, this.offset + take), written);
      written += take;
      this.offset += take;
      this.played += take;
      this.playedByTurn.set(chunk.turn, (this.playedByTurn.get(chunk.turn) || 0) + take);
      if (this.offset === chunk.samples.length) {
        this.chunks.shift();
        this.offset = 0;
        if (!this.chunks.length) this.report("drained", chunk.turn);
      }
    }
    out.fill(0, written);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (written && this.sinceReport >= sampleRate / 20) this.report("progress");
    return true;
  }
}

registerProcessor("s2s-playback", PlaybackProcessor);
